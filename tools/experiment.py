"""`keras-embed experiment NAME`: the papers' experiments, run here.

Each experiment is also a top-level command (`keras-embed bn-ablation`, ...).
"""

import click


@click.group()
def experiment():
    """Reproduce the Embedding Principle papers' experiments on your data."""

"""The `keras-embed` command. `--help` stays fast: commands import the library lazily.

Exit codes: 0 ok, 1 internal error, 2 bad usage or input, 3 verification failed,
4 unsupported model, 130 interrupted (143 for SIGTERM).
"""

import click

from keras_embed.tools.analyze import analyze
from keras_embed.tools.bn_ablation import bn_ablation, data_size
from keras_embed.tools.embed import embed
from keras_embed.tools.condensation import condensation
from keras_embed.tools.experiment import experiment
from keras_embed.tools.hessian import hessian
from keras_embed.tools.landscape import landscape
from keras_embed.tools.prune import prune
from keras_embed.tools.strict_saddle import strict_saddle
from keras_embed.tools.taxonomy import taxonomy


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="keras-embed")
def main():
    """Find and remove the redundancy the Embedding Principle predicts in Keras networks.

    Exit codes: 0 ok, 2 bad usage or input, 3 verification failed, 4 unsupported model,
    130 interrupted (Ctrl-C; 143 for SIGTERM), 1 internal error.
    """


main.add_command(analyze)
main.add_command(prune)
main.add_command(embed)
main.add_command(experiment)
main.add_command(hessian)
main.add_command(landscape)
experiment.add_command(condensation)
experiment.add_command(taxonomy)
for command in (bn_ablation, data_size, strict_saddle):
    main.add_command(command)
    experiment.add_command(command)

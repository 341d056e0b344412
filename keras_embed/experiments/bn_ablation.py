"""Does BatchNormalization keep training off the lifted critical manifolds? Does more data?

The depth paper claims that BatchNormalization speeds up the decay of the training loss
by suppressing layer linearization (layers computing linearly on the training inputs,
which the lifted critical manifolds require), and that more training data shrinks those
manifolds and accelerates training. `bn_ablation` trains one deep MLP with and without
BatchNormalization after each hidden Dense (same data, same initial Dense weights, several
seeds); `data_size` trains it on growing nested subsets of the data. Both return a
`Comparison`; `experiments.report` summarizes and writes it.

Example:
    >>> comparison = bn_ablation(load_task("digits"), Settings.quick())
    >>> sorted(comparison.variants)
    ['with_bn', 'without_bn']
"""

import dataclasses
import platform

import keras
import numpy as np
import tensorflow as tf

from keras_embed import devices
from keras_embed.errors import InputError
from keras_embed.experiments.training import Settings, build_mlp, default_batch_size, train

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Runs of several variants of one experiment.

    Attributes:
        experiment: "bn_ablation" or "data_size".
        task: name of the data.
        settings: the `Settings` every variant used.
        variants: variant name -> list of `Run`, one per seed.
        device: where it ran (see `resolve_device`).
        details: per-variant facts, e.g. the number of training samples.
    """

    experiment: str
    task: str
    settings: Settings
    variants: dict
    device: dict
    details: dict = dataclasses.field(default_factory=dict)


def resolve_device(device="auto", mixed_precision=False):
    """`devices.resolve_device`, its record with `mixed_precision` and the library versions.

    Raises:
        InputError: as `devices.resolve_device`; mixed precision without a GPU.
    """
    name, record = devices.resolve_device(device)
    if mixed_precision and name != "/GPU:0":
        raise InputError("--mixed-precision needs a GPU (float16 is slow and inexact on a CPU); drop it or use a GPU")
    return name, {
        **record, "mixed_precision": mixed_precision,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
    }


def _run_variants(experiment, task_name, settings, device, variants, on_step):
    """Trains every (variant, seed): `variants` maps a name to (task, batch_norm)."""
    name, record = resolve_device(device, settings.mixed_precision)
    settings = dataclasses.replace(settings, batch_size=settings.batch_size or default_batch_size(name))
    runs = {}
    for variant, (task, batch_norm) in variants.items():
        runs[variant] = [
            train(build_mlp(settings, task, batch_norm, seed), task, settings, seed, name, on_step)
            for seed in settings.seeds
        ]
    details = {variant: {"samples": len(task.x), "batch_norm": batch_norm} for variant, (task, batch_norm) in variants.items()}
    return Comparison(experiment, task_name, settings, runs, record, details)


def bn_ablation(task, settings=Settings(), device="auto", on_step=None):
    """Trains the MLP of `settings` on `task` without and with BatchNormalization.

    Returns:
        a `Comparison` with variants "without_bn" and "with_bn".
    """
    variants = {"without_bn": (task, False), "with_bn": (task, True)}
    return _run_variants("bn_ablation", task.name, settings, device, variants, on_step)


def data_size(task, settings=Settings(), fractions=DEFAULT_FRACTIONS, batch_norm=False, device="auto", on_step=None):
    """Trains the MLP of `settings` on nested random subsets holding `fractions` of `task`.

    Returns:
        a `Comparison` with one variant per subset, named by its number of samples ("n=179").
    """
    if not fractions or any(not 0 < fraction <= 1 for fraction in fractions):
        raise InputError(f"data fractions must be in (0, 1]. Received: {list(fractions)}")
    order = np.random.default_rng(0).permutation(len(task.x))
    sizes = sorted({max(1, round(fraction * len(task.x))) for fraction in fractions})
    variants = {f"n={size}": (task.subset(order[:size]), batch_norm) for size in sizes}
    return _run_variants("data_size", task.name, settings, device, variants, on_step)

"""The taxonomy paper's phase diagram in small: width against batch size on the digits.

Yang et al. (NeurIPS 2021) train a grid of models (a load-like axis: width; a
temperature-like axis: batch size), a few seeds per cell, and measure four metrics per cell:
the training loss, the Hessian's top eigenvalue and trace (local), the mode connectivity mc
of a Bézier curve between seeds and the CKA similarity of their outputs (global). Here:
scikit-learn's digits (1,797 rows, a seeded 2/3 training split, the rest to test), a
64-w-w-10 relu MLP, SGD with momentum 0.9 at a fixed learning rate (as the paper), every
cell trained for the same epochs with seeds 0..s-1. The metrics come from
`landscape.compare_models` on the training rows: per model the top eigenvalue and trace on
200 of them; per pair of seeds mc (on the training error, in points) along the trained
Bézier curve and the output CKA (of the logits; the paper takes the softmax's on mixup
inputs); each cell shows the mean over models or pairs.

Example:
    >>> result = taxonomy(TaxonomySettings.quick())
    >>> result["cells"][0]["mc"]
    -0.8
"""

import dataclasses
import time

import keras
import numpy as np

from keras_embed.experiments.report import write_result
from keras_embed.files.data import bundled_dataset
from keras_embed.landscape.compare import compare_models

METRICS = (("test_accuracy", "test accuracy"), ("train_loss", "training loss"),
           ("hessian_top", "Hessian top eigenvalue (log10)"), ("hessian_trace", "Hessian trace (log10)"),
           ("mc", "mode connectivity mc (Bézier, error points)"), ("cka", "output CKA between seeds"))
LOGGED = ("hessian_top", "hessian_trace")


@dataclasses.dataclass(frozen=True)
class TaxonomySettings:
    """The grid and the recipe (`quick()`: a grid that runs in about a minute on a CPU)."""

    widths: tuple = (4, 8, 16, 32, 64)
    batch_sizes: tuple = (16, 64, 256)
    seeds: int = 3
    epochs: int = 30
    learning_rate: float = 0.05
    curve_epochs: int = 20
    trace_samples: int = 20

    @classmethod
    def quick(cls):
        return cls(widths=(4, 16, 64), batch_sizes=(16, 256), seeds=2, epochs=8, curve_epochs=4, trace_samples=4)


def digits_split():
    """(x_train, y_train, x_test, y_test): digits, a seeded (0) permutation, 2/3 to train."""
    x, y = bundled_dataset("digits")
    order = np.random.default_rng(0).permutation(len(x))
    train, test = np.sort(order[:len(x) * 2 // 3]), np.sort(order[len(x) * 2 // 3:])
    return x[train], y[train], x[test], y[test]


def trained(width, batch_size, seed, settings, x, y):
    """A 64-width-width-10 relu MLP trained on (x, y) with SGD (momentum 0.9), seed `seed`."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"), keras.layers.Dense(10)],
                             name=f"w{width}_b{batch_size}_s{seed}")
    model.compile(keras.optimizers.SGD(settings.learning_rate, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=batch_size, epochs=settings.epochs, verbose=0)
    return model


def cell(width, batch_size, settings, split):
    """The four metrics (means over seeds or pairs of seeds) and test accuracy of one cell."""
    x, y, x_test, y_test = split
    models = [trained(width, batch_size, seed, settings, x, y) for seed in range(settings.seeds)]
    figures = compare_models(models, x, y, "sparse_categorical_crossentropy", from_logits=True,
                             curve_epochs=settings.curve_epochs, trace_samples=settings.trace_samples)
    accuracy = [float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test)) for model in models]
    mean = lambda rows, key: float(np.mean([row[key] for row in rows]))  # noqa: E731
    return {"width": width, "batch_size": batch_size, "test_accuracy": float(np.mean(accuracy)),
            "train_loss": mean(figures["models"], "loss"), "train_error": mean(figures["models"], "error"),
            "hessian_top": mean(figures["models"], "hessian_top"), "hessian_trace": mean(figures["models"], "hessian_trace"),
            "mc": float(np.mean([pair["bezier"]["mc"] for pair in figures["pairs"]])),
            "linear_mc": float(np.mean([pair["linear"]["mc"] for pair in figures["pairs"]])),
            "cka": mean(figures["pairs"], "cka_output"), "distance": mean(figures["pairs"], "distance")}


def taxonomy(settings=TaxonomySettings(), on_cell=None):
    """Every cell of the grid (widths x batch sizes), with the settings and the seconds taken."""
    start, split = time.perf_counter(), digits_split()
    cells = []
    for width in settings.widths:
        for batch_size in settings.batch_sizes:
            cells.append(cell(width, batch_size, settings, split))
            if on_cell is not None:
                on_cell(cells[-1])
    return {"settings": dataclasses.asdict(settings), "task": "digits", "train_rows": len(split[0]),
            "test_rows": len(split[2]), "cells": cells, "seconds": round(time.perf_counter() - start, 1)}


def summary_table(result):
    """Markdown: one row per cell."""
    lines = ["| width | batch size | test accuracy | training loss | Hessian top eigenvalue | Hessian trace "
             "| mc (Bézier) | mc (linear) | output CKA | distance |", "|---" * 10 + "|"]
    for row in result["cells"]:
        lines.append(f"| {row['width']} | {row['batch_size']} | {row['test_accuracy']:.2%} | {row['train_loss']:.3g} | "
                     f"{row['hessian_top']:.3g} | {row['hessian_trace']:.3g} | {row['mc']:.2f} | "
                     f"{row['linear_mc']:.2f} | {row['cka']:.3f} | {row['distance']:.3g} |")
    return "\n".join(lines)


def write(result, folder, overwrite=False):
    """results.json, cells.csv, summary.md and phases.png, all or nothing."""
    names = list(result["cells"][0])
    rows = [names] + [[row[name] for name in names] for row in result["cells"]]
    summary = f"# Phase diagram of the digits MLP (width x batch size)\n\n{summary_table(result)}\n"
    return write_result(folder, result, "cells.csv", rows, summary, {"phases.png": lambda path: _plot(result, path)},
                        overwrite)


def _plot(result, path):
    """One heat map per metric: width (rows) against batch size (columns)."""
    from matplotlib.figure import Figure

    widths, batches = result["settings"]["widths"], result["settings"]["batch_sizes"]
    figure = Figure(figsize=(15, 8), layout="constrained")
    for axes, (key, title) in zip(figure.subplots(2, 3).ravel(), METRICS):
        grid = np.array([[next(row[key] for row in result["cells"] if row["width"] == w and row["batch_size"] == b)
                          for b in batches] for w in widths], dtype=float)
        grid = np.log10(np.maximum(grid, 1e-12)) if key in LOGGED else grid
        limits = {"cmap": "RdBu", "vmin": -30, "vmax": 30} if key == "mc" else {"cmap": "viridis"}  # the paper's mc scale
        image = axes.imshow(grid, origin="lower", aspect="auto", **limits)
        axes.set(xticks=range(len(batches)), xticklabels=batches, yticks=range(len(widths)), yticklabels=widths,
                 xlabel="batch size (temperature)", ylabel="width (load)", title=title)
        axes.title.set_fontsize(9)
        figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=100)

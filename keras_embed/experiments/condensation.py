"""The width paper's plateau, watched by `EmbeddingMonitor`, with and without its escape.

The setting of the width paper's Fig. 1 in small: a 1-500-1 network (tanh, and relu for
contrast) with every weight drawn from N(0, 1e-3^2), fitted by full-batch Adam(0.01) with MSE
to `SAMPLES` points of y = 2x^2 - 0.6 on [-1, 1] for `EPOCHS` epochs. From a small start the
units condense: the tanh network first reaches the best linear fit (a width-1 critical point
embedded in the wide network: a saddle) and sits there, then leaves it; relu, whose units
split into two directions at once, has no plateau. The monitor watches at its defaults
(patience 5, curvature from 20 Lanczos steps), the 50 points as probe (x, y), with
`action="warn"` (only records) or `action="escape"`; it also analyses the redundancy
every `EVERY` epochs so the effective width is recorded over time.

Per run: the loss, the effective width, the smallest over largest Hessian eigenvalue at each
check, and the stalled / converged flags, per epoch. Per activation and action, the median
over seeds of: the epoch the first plateau is left (the loss below 0.9 of the best linear
fit's), the first epoch below `LEVEL`, and the final loss.

Example:
    >>> result = condensation(seeds=(0,), activations=("tanh",))
    >>> result["summary"]["tanh"]["escape"]["leave_plateau"] < result["summary"]["tanh"]["warn"]["leave_plateau"]
    True
"""

import csv
import json
import statistics
import time

import keras
import numpy as np

from keras_embed.callbacks import EmbeddingMonitor
from keras_embed.experiments.report import figure_and_axes, write_folder

SAMPLES, WIDTH, INIT_STD, LEARNING_RATE, EPOCHS, EVERY = 50, 500, 1e-3, 0.01, 400, 10
LEVEL = 0.002
ACTIONS = ("warn", "escape")
FILES = ("results.json", "curves.csv", "summary.md", "loss.png")


def plateau_task():
    """(x, y): `SAMPLES` points of y = 2x^2 - 0.6 on [-1, 1], float32, shape (n, 1)."""
    x = np.linspace(-1.0, 1.0, SAMPLES)[:, None]
    return x.astype("float32"), (2 * x**2 - 0.6).astype("float32")


def linear_fit_loss(x, y):
    """The MSE of the best affine fit: the loss of the width-1 plateau."""
    design = np.c_[x, np.ones_like(x)]
    residual = design @ np.linalg.lstsq(design, y, rcond=None)[0] - y
    return float(np.mean(residual**2))


def small_network(activation, seed):
    """The 1-`WIDTH`-1 network, every weight and bias from N(0, `INIT_STD`^2), seeded."""
    keras.utils.set_random_seed(seed)

    def small(offset):
        return keras.initializers.RandomNormal(stddev=INIT_STD, seed=seed * 10 + offset)

    return keras.Sequential([
        keras.Input((1,), name="x"),
        keras.layers.Dense(WIDTH, activation, kernel_initializer=small(0), bias_initializer=small(1), name="hidden"),
        keras.layers.Dense(1, kernel_initializer=small(2), bias_initializer=small(3), name="output"),
    ], name=f"{activation}_1_{WIDTH}_1")


def run(activation, action, seed, epochs=EPOCHS, every=EVERY):
    """One fit with the monitor; returns its per-epoch records (lists) by name."""
    x, y = plateau_task()
    model = small_network(activation, seed)
    model.compile(keras.optimizers.Adam(LEARNING_RATE), "mse")
    monitor = EmbeddingMonitor(x, y, action=action, every=every, seed=seed)
    logs = model.fit(x, y, batch_size=SAMPLES, epochs=epochs, shuffle=False, verbose=0, callbacks=[monitor]).history
    return {"loss": logs["loss"], "effective_width": logs["embed/hidden/effective_width"],
            "min_curvature": logs["embed/min_curvature"], "stalled": logs["embed/stalled"],
            "converged": logs["embed/converged"]}


def first_epoch(values, below):
    """The first epoch (1-based) whose value is below `below`, or None."""
    return next((epoch + 1 for epoch, value in enumerate(values) if value < below), None)


def figures(records, plateau):
    """The compared figures of one run (None: not reached within the run) and its epochs flagged stalled."""
    return {"leave_plateau": first_epoch(records["loss"], 0.9 * plateau),
            "reach_level": first_epoch(records["loss"], LEVEL), "final_loss": records["loss"][-1],
            "stalled_epochs": int(sum(records["stalled"]))}


def median(values, epochs):
    """Median of epochs, a run that never got there counting as `epochs` + 1."""
    return statistics.median(epochs + 1 if value is None else value for value in values)


def condensation(seeds=(0, 1, 2, 3, 4), activations=("tanh", "relu"), actions=ACTIONS, epochs=EPOCHS):
    """Every run and the per-(activation, action) medians; see the module docstring."""
    start = time.perf_counter()
    plateau = linear_fit_loss(*plateau_task())
    runs, summary = [], {}
    for activation in activations:
        for action in actions:
            rows = []
            for seed in seeds:
                records = run(activation, action, seed, epochs)
                rows.append(figures(records, plateau))
                runs.append({"activation": activation, "action": action, "seed": seed, **rows[-1], "records": records})
            summary.setdefault(activation, {})[action] = {
                "leave_plateau": median([row["leave_plateau"] for row in rows], epochs),
                "reach_level": median([row["reach_level"] for row in rows], epochs),
                "final_loss": statistics.median(row["final_loss"] for row in rows),
                "stalled_epochs": statistics.median(row["stalled_epochs"] for row in rows),
            }
    settings = {"samples": SAMPLES, "width": WIDTH, "init_std": INIT_STD, "learning_rate": LEARNING_RATE,
                "epochs": epochs, "every": EVERY, "level": LEVEL, "seeds": list(seeds), "linear_fit_loss": plateau}
    return {"settings": settings, "summary": summary, "runs": runs, "seconds": round(time.perf_counter() - start, 1)}


def summary_table(result):
    """Markdown: per activation and action, the medians over seeds."""
    epochs = result["settings"]["epochs"]
    lines = ["| network | action | epoch leaving the plateau | first epoch below "
             f"{LEVEL:g} | final loss | epochs flagged stalled |", "| --- | --- | --- | --- | --- | --- |"]
    for activation, actions in result["summary"].items():
        for action, row in actions.items():
            def epoch(value):
                return f"> {epochs}" if value > epochs else f"{value:g}"
            lines.append(f"| {activation} 1-{WIDTH}-1 | {action} | {epoch(row['leave_plateau'])} | "
                         f"{epoch(row['reach_level'])} | {row['final_loss']:.2e} | {row['stalled_epochs']:g} |")
    return "\n".join(lines)


def write(result, folder, overwrite=False):
    """results.json, curves.csv (one row per run and epoch), summary.md and loss.png, all or nothing."""

    def files(staging):
        (staging / "results.json").write_text(json.dumps(result, indent=1, default=float))
        with (staging / "curves.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            names = list(result["runs"][0]["records"]) if result["runs"] else []
            writer.writerow(["activation", "action", "seed", "epoch", *names])
            for run_ in result["runs"]:
                for epoch, values in enumerate(zip(*run_["records"].values()), start=1):
                    writer.writerow([run_["activation"], run_["action"], run_["seed"], epoch, *values])
        (staging / "summary.md").write_text(f"# The width paper's plateau, with and without escape\n\n"
                                            f"{summary_table(result)}\n")
        _plot(result, staging / "loss.png")

    write_folder(folder, files, overwrite)
    return list(FILES)


def _plot(result, path):
    figure, axes = figure_and_axes()
    colours = {}
    for run_ in result["runs"]:
        key = f"{run_['activation']} {run_['action']}"
        line, = axes.plot(run_["records"]["loss"], color=colours.get(key), alpha=0.7,
                          label=None if key in colours else key)
        colours.setdefault(key, line.get_color())
        stalled = np.flatnonzero(run_["records"]["stalled"])
        axes.plot(stalled, np.asarray(run_["records"]["loss"])[stalled], ".", color=line.get_color(), markersize=2)
    axes.axhline(result["settings"]["linear_fit_loss"], color="grey", linestyle=":", label="best linear fit")
    axes.set(yscale="log", xlabel="epoch", ylabel="training loss",
             title="1-500-1 from a small start: loss per seed (dots: flagged stalled)")
    axes.title.set_fontsize(9)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)

"""The width paper's plateaus, watched by `EmbeddingMonitor`, with and without its escape.

Two small-initialisation fits, each a saddle embedded from a narrower network (`TASKS`):
- "1d", the setting of the width paper's Fig. 1 in small: a 1-500-1 network (tanh, and relu
  for contrast) with every weight drawn from N(0, 1e-3^2), fitted by full-batch Adam(0.01)
  with MSE to 50 points of y = 2x^2 - 0.6 on [-1, 1] for 400 epochs. The tanh units condense
  and the network sits on the best linear fit (a width-1 critical point) before it leaves it;
  relu, whose units split into two directions at once, has no plateau.
- "digits", the setting of the paper's Fig. 5 (two-layer relu, MSE on one-hot targets,
  full-batch Adam, 1000 samples, tiny initialisation) on scikit-learn's 8x8 digits, sped up
  to fit a CPU: 64-200-10, weights from N(0, 1e-6^2), Adam(3e-4), 600 epochs. The network
  first fits the class frequencies with every hidden unit still near zero (the width-0
  critical point, a saddle whose escape grows a unit pair) and sits there before the units
  grow.

The monitor watches at its defaults (patience 5, curvature from 20 Lanczos steps), the
training rows as probe (x, y; at most 512, seeded), with `action="warn"` (only records) or
`action="escape"`; it also analyses the redundancy every `EVERY` epochs so the effective
width is recorded over time.

Per run: the loss, the effective width, the smallest over largest Hessian eigenvalue at each
check, and the stalled / converged flags, per epoch. Per network and action, the median over
seeds of: the epoch the first plateau is left (the loss below 0.9 of the plateau's), the
first epoch below the task's `level`, and the final loss.

Example:
    >>> result = condensation(seeds=(0,), tasks=("1d",), activations=("tanh",))
    >>> medians = result["summary"]["tanh 1-500-1"]["actions"]
    >>> medians["escape"]["leave_plateau"] < medians["warn"]["leave_plateau"]
    True
"""

import dataclasses
import statistics
import time
from typing import Callable

import keras
import numpy as np

from keras_embed.callbacks import EmbeddingMonitor
from keras_embed.experiments.report import figure_and_panels, write_result
from keras_embed.files.data import bundled_dataset

EVERY = 10
ACTIONS = ("warn", "escape")


def plateau_task():
    """(x, y): 50 points of y = 2x^2 - 0.6 on [-1, 1], float32, shape (n, 1)."""
    x = np.linspace(-1.0, 1.0, 50)[:, None]
    return x.astype("float32"), (2 * x**2 - 0.6).astype("float32")


def digits_task(samples=1000):
    """(x, y): the first `samples` of scikit-learn's digits, features in [0, 1], one-hot targets."""
    x, labels = bundled_dataset("digits")
    return x[:samples], np.eye(10, dtype="float32")[labels[:samples]]


def linear_fit_loss(x, y):
    """The MSE of the best affine fit: the loss of the width-1 plateau of the 1-D task."""
    design = np.c_[x, np.ones(len(x))]
    residual = design @ np.linalg.lstsq(design, y, rcond=None)[0] - y
    return float(np.mean(residual**2))


def mean_fit_loss(x, y):
    """The MSE of predicting the mean target: the loss of the width-0 critical point."""
    return float(np.mean((y - y.mean(axis=0)) ** 2))


@dataclasses.dataclass(frozen=True)
class Task:
    """One small-initialisation fit: its data, the plateau's loss, the network and its optimiser."""
    data: Callable
    plateau_loss: Callable
    activations: tuple
    width: int
    init_std: float
    learning_rate: float
    epochs: int
    level: float


TASKS = {
    "1d": Task(plateau_task, linear_fit_loss, ("tanh", "relu"), width=500, init_std=1e-3, learning_rate=0.01,
               epochs=400, level=0.002),
    "digits": Task(digits_task, mean_fit_loss, ("relu",), width=200, init_std=1e-6, learning_rate=3e-4,
                   epochs=600, level=0.02),
}


def network_name(task, activation):
    """'tanh 1-500-1': the activation and the layer widths."""
    x, y = TASKS[task].data()
    return f"{activation} {x.shape[1]}-{TASKS[task].width}-{y.shape[1]}"


def small_network(task, activation, seed):
    """The task's two-layer network, every weight and bias from N(0, init_std^2), seeded."""
    x, y = TASKS[task].data()
    keras.utils.set_random_seed(seed)

    def small(offset):
        return keras.initializers.RandomNormal(stddev=TASKS[task].init_std, seed=seed * 10 + offset)

    return keras.Sequential([
        keras.Input((x.shape[1],), name="x"),
        keras.layers.Dense(TASKS[task].width, activation, kernel_initializer=small(0), bias_initializer=small(1),
                           name="hidden"),
        keras.layers.Dense(y.shape[1], kernel_initializer=small(2), bias_initializer=small(3), name="output"),
    ], name=network_name(task, activation).replace(" ", "_").replace("-", "_"))


def run(activation, action, seed, epochs=None, every=EVERY, task="1d"):
    """One full-batch fit with the monitor; returns its per-epoch records (lists) by name."""
    x, y = TASKS[task].data()
    model = small_network(task, activation, seed)
    model.compile(keras.optimizers.Adam(TASKS[task].learning_rate), "mse")
    monitor = EmbeddingMonitor(x, y, action=action, every=every, seed=seed)
    logs = model.fit(x, y, batch_size=len(x), epochs=epochs or TASKS[task].epochs, shuffle=False, verbose=0,
                     callbacks=[monitor]).history
    return {"loss": logs["loss"], "effective_width": logs["embed/hidden/effective_width"],
            "min_curvature": logs["embed/min_curvature"], "stalled": logs["embed/stalled"],
            "converged": logs["embed/converged"]}


def first_epoch(values, below):
    """The first epoch (1-based) whose value is below `below`, or None."""
    return next((epoch + 1 for epoch, value in enumerate(values) if value < below), None)


def figures(records, plateau, level):
    """The compared figures of one run (None: not reached within the run) and its epochs flagged stalled."""
    return {"leave_plateau": first_epoch(records["loss"], 0.9 * plateau),
            "reach_level": first_epoch(records["loss"], level), "final_loss": records["loss"][-1],
            "stalled_epochs": int(sum(records["stalled"]))}


def median(values, epochs):
    """Median of epochs, a run that never got there counting as `epochs` + 1."""
    return statistics.median(epochs + 1 if value is None else value for value in values)


def condensation(seeds=(0, 1, 2, 3, 4), tasks=tuple(TASKS), activations=None, actions=ACTIONS, epochs=None):
    """Every run and the per-(network, action) medians; see the module docstring.

    `activations` (default: each task's own) and `epochs` (default: each task's) override the tasks'.
    """
    start = time.perf_counter()
    runs, summary, settings = [], {}, {"every": EVERY, "seeds": list(seeds), "tasks": {}}
    for task in tasks:
        setting = TASKS[task]
        plateau, length = setting.plateau_loss(*setting.data()), epochs or setting.epochs
        settings["tasks"][task] = {**dataclasses.asdict(setting), "data": setting.data.__name__,
                                   "plateau_loss": setting.plateau_loss.__name__, "epochs": length,
                                   "plateau": plateau}
        for activation in activations or setting.activations:
            network = network_name(task, activation)
            for action in actions:
                rows = []
                for seed in seeds:
                    records = run(activation, action, seed, length, task=task)
                    rows.append(figures(records, plateau, setting.level))
                    runs.append({"task": task, "network": network, "activation": activation, "action": action,
                                 "seed": seed, **rows[-1], "records": records})
                summary.setdefault(network, {"task": task, "actions": {}})["actions"][action] = {
                    "leave_plateau": median([row["leave_plateau"] for row in rows], length),
                    "reach_level": median([row["reach_level"] for row in rows], length),
                    "final_loss": statistics.median(row["final_loss"] for row in rows),
                    "stalled_epochs": statistics.median(row["stalled_epochs"] for row in rows),
                }
    return {"settings": settings, "summary": summary, "runs": runs, "seconds": round(time.perf_counter() - start, 1)}


def summary_table(result):
    """Markdown: per network and action, the medians over seeds."""
    lines = ["| task | network | action | epoch leaving the plateau | first epoch below the level | final loss "
             "| epochs flagged stalled |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for network, medians in result["summary"].items():
        setting = result["settings"]["tasks"][medians["task"]]
        for action, row in medians["actions"].items():
            def epoch(value):
                return f"> {setting['epochs']}" if value > setting["epochs"] else f"{value:g}"
            lines.append(f"| {medians['task']} | {network} | {action} | {epoch(row['leave_plateau'])} | "
                         f"{epoch(row['reach_level'])} (level {setting['level']:g}) | {row['final_loss']:.2e} | "
                         f"{row['stalled_epochs']:g} |")
    return "\n".join(lines)


def write(result, folder, overwrite=False):
    """results.json, curves.csv (one row per run and epoch), summary.md and loss.png, all or nothing."""
    names = list(result["runs"][0]["records"]) if result["runs"] else []
    rows = [["task", "activation", "action", "seed", "epoch", *names]]
    for run_ in result["runs"]:
        for epoch, values in enumerate(zip(*run_["records"].values()), start=1):
            rows.append([run_["task"], run_["activation"], run_["action"], run_["seed"], epoch, *values])
    summary = f"# The width paper's plateaus, with and without escape\n\n{summary_table(result)}\n"
    return write_result(folder, result, "curves.csv", rows, summary, {"loss.png": lambda path: _plot(result, path)},
                        overwrite)


def _plot(result, path):
    """One panel per task: the loss of every run (dots: epochs flagged stalled), the plateau's loss dotted."""
    tasks = list(result["settings"]["tasks"])
    figure, panels = figure_and_panels(len(tasks))
    for axes, task in zip(panels, tasks):
        colours = {}
        for run_ in (run_ for run_ in result["runs"] if run_["task"] == task):
            key = f"{run_['activation']} {run_['action']}"
            line, = axes.plot(run_["records"]["loss"], color=colours.get(key), alpha=0.7,
                              label=None if key in colours else key)
            colours.setdefault(key, line.get_color())
            stalled = np.flatnonzero(run_["records"]["stalled"])
            axes.plot(stalled, np.asarray(run_["records"]["loss"])[stalled], ".", color=line.get_color(),
                      markersize=2)
        axes.axhline(result["settings"]["tasks"][task]["plateau"], color="grey", linestyle=":",
                     label="plateau (critical point of a narrower network)")
        axes.set(yscale="log", xlabel="epoch", ylabel="training loss",
                 title=f"{task}: loss per seed from a small start (dots: flagged stalled)")
        axes.title.set_fontsize(9)
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)

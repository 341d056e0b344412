"""Summarize a `Comparison` and write it: results.json, curves.csv, summary.md and PNG plots.

Summary metrics (mean ± std over seeds, per variant): steps until the training loss first
falls below 10%, 1% and 0.1% of its starting value (the mean first record over all runs,
so every variant is held to the same levels), the loss at 25%, 50% and 100% of training,
the area under the log10 loss curve per step (lower is faster decay), the mean linear
fraction over layers and checkpoints after the start, and the most linearized layers seen.

Example:
    >>> write(comparison, "bn_ablation/")
    ['results.json', 'curves.csv', 'summary.md', 'loss.png', 'linear_fraction.png']
"""

import csv
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from keras_embed.errors import InputError
from keras_embed.files.save import check_side_output, write_errors

LEVELS = (1e-1, 1e-2, 1e-3)
AT_FRACTIONS = (0.25, 0.5, 1.0)
FILES = ("results.json", "curves.csv", "summary.md", "loss.png", "linear_fraction.png")


def _spread(values):
    """{"mean", "std", "seeds"} of the values that are not None."""
    present = [value for value in values if value is not None]
    if not present:
        return {"mean": None, "std": None, "seeds": 0}
    return {"mean": float(np.mean(present)), "std": float(np.std(present)), "seeds": len(present)}


def _steps_to(run, level):
    below = np.flatnonzero(run.loss <= level)
    return int(run.steps[below[0]]) if len(below) else None


def summarize(comparison):
    """Per variant, the summary metrics (see the module docstring) as nested dicts."""
    runs = [run for variant in comparison.variants.values() for run in variant]
    start = float(np.mean([run.loss[0] for run in runs]))
    summary = {"start_loss": start, "variants": {}}
    for variant, variant_runs in comparison.variants.items():
        metrics = {}
        for level in LEVELS:
            metrics[f"steps_to_{level:g}x_start"] = _spread([_steps_to(run, level * start) for run in variant_runs])
        for fraction in AT_FRACTIONS:
            metrics[f"loss_at_{round(fraction * 100)}pct"] = _spread(
                [float(run.loss[max(0, int(np.ceil(fraction * len(run.loss))) - 1)]) for run in variant_runs]
            )
        metrics["log10_loss_area"] = _spread([float(np.mean(np.log10(np.maximum(run.loss, 1e-30)))) for run in variant_runs])
        metrics["mean_linear_fraction"] = _spread([float(run.linear_fraction[1:].mean()) for run in variant_runs])
        metrics["max_linearized_layers"] = _spread([int(run.linearized_layers.max()) for run in variant_runs])
        summary["variants"][variant] = metrics
    return summary


def _cell(spread, seeds):
    if spread["mean"] is None:
        return "not reached"
    text = f"{spread['mean']:.4g} ± {spread['std']:.2g}"
    return text if spread["seeds"] == seeds else f"{text} ({spread['seeds']}/{seeds} seeds)"


def summary_table(comparison, summary):
    """The summary as a markdown table: one row per metric, one column per variant."""
    variants = list(summary["variants"])
    seeds = len(comparison.settings.seeds)
    lines = ["| metric | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for metric in summary["variants"][variants[0]]:
        cells = [_cell(summary["variants"][variant][metric], seeds) for variant in variants]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(comparison, folder, overwrite=False):
    """Writes the files of `FILES` into `folder`, all or nothing (see `write_folder`). Returns
    the file names.

    Raises:
        InputError: see `check_folder`.
    """

    def files(staging):
        summary = summarize(comparison)
        _write_json(comparison, summary, staging / "results.json")
        _write_csv(comparison, staging / "curves.csv")
        (staging / "summary.md").write_text(f"# {comparison.experiment} on {comparison.task}\n\n{summary_table(comparison, summary)}\n")
        _plot_loss(comparison, staging / "loss.png")
        _plot_linear_fraction(comparison, staging / "linear_fraction.png")

    write_folder(folder, files, overwrite)
    return list(FILES)


def write_folder(folder, files, overwrite=False):
    """Calls `files(staging)` to write a result folder's files (results.json among them) into a
    temporary sibling folder, then renames it to `folder`: all or nothing.

    Raises:
        InputError: the folder exists (without `overwrite`), or exists and holds something
            other than an earlier result (`check_folder`).
    """
    folder = Path(folder)
    check_folder(folder, overwrite)
    staging = None
    try:
        with write_errors(folder):
            staging = Path(tempfile.mkdtemp(prefix=f".ke-{os.getpid()}-", suffix=".tmp", dir=folder.parent))
            staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is not
            files(staging)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def write_result(folder, result, csv_name, rows, summary, plots, overwrite=False):
    """An experiment's folder, all or nothing (`write_folder`): results.json (`result`),
    `csv_name` (`rows`: the header, then one list per row), summary.md (`summary`, Markdown)
    and each plot ({file name: function writing it to a path}). Returns the file names."""

    def files(staging):
        (staging / "results.json").write_text(json.dumps(result, indent=1, default=float))
        with (staging / csv_name).open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
        (staging / "summary.md").write_text(summary)
        for name, plot in plots.items():
            plot(staging / name)

    write_folder(folder, files, overwrite)
    return ["results.json", csv_name, "summary.md", *plots]


def check_folder(folder, overwrite=False):
    """Refuses, before any work, a result folder `write` could not replace: an existing one
    without `overwrite`, anything but an earlier result folder, a device or FIFO (as
    `io.check_side_output`), a missing, read-only or full parent folder.
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        check_side_output(folder)  # a new folder there: its parent must take it
    elif not folder.is_dir() or not (folder / "results.json").is_file():
        raise InputError(f"'{folder}' is not an earlier result folder (no results.json); choose another output")
    elif not overwrite:
        raise InputError(f"output folder '{folder}' exists; pass --overwrite to replace it or choose another")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(comparison, summary, path):
    device = dict(comparison.device)
    document = {
        "experiment": comparison.experiment, "task": comparison.task,
        "config": {**dataclasses.asdict(comparison.settings), "seeds": list(comparison.settings.seeds)},
        "versions": device.pop("versions", {}), "device": device, "details": comparison.details,
        "runs": {variant: [run.to_dict() for run in runs] for variant, runs in comparison.variants.items()},
        "summary": summary,
    }
    path.write_text(json.dumps(document, indent=1))


def _write_csv(comparison, path):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "step", "loss", "linear_fraction", "linearized_layers"])
        for variant, runs in comparison.variants.items():
            for run in runs:
                losses = dict(zip(run.steps.tolist(), run.loss.tolist()))
                checkpoints = {step: index for index, step in enumerate(run.checkpoint_steps.tolist())}
                for step in sorted(set(losses) | set(checkpoints)):
                    index = checkpoints.get(step)
                    writer.writerow([
                        variant, run.seed, step, losses.get(step, ""),
                        "" if index is None else float(run.linear_fraction[index].mean()),
                        "" if index is None else int(run.linearized_layers[index]),
                    ])


def figure_and_panels(count):
    """A figure of `count` panels side by side, and their axes (a list)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or window

    figure = Figure(figsize=(6.4 * count, 4.0), layout="constrained")
    return figure, list(figure.subplots(1, count, squeeze=False)[0])


def figure_and_axes():
    figure, (axes,) = figure_and_panels(1)
    return figure, axes


def _plot_loss(comparison, path):
    figure, axes = figure_and_axes()
    for variant, runs in comparison.variants.items():
        logs = np.log10(np.maximum(np.stack([run.loss for run in runs]), 1e-30))
        mean, std = logs.mean(axis=0), logs.std(axis=0)
        line, = axes.plot(runs[0].steps, 10**mean, label=variant)
        axes.fill_between(runs[0].steps, 10 ** (mean - std), 10 ** (mean + std), color=line.get_color(), alpha=0.2)
    axes.set(yscale="log", xlabel="training step", ylabel="training loss",
             title=f"{comparison.experiment} on {comparison.task}: loss (geometric mean ± std over seeds)")
    axes.title.set_fontsize(9)
    axes.legend()
    figure.savefig(path, dpi=100)


def _plot_linear_fraction(comparison, path):
    figure, axes = figure_and_axes()
    for variant, runs in comparison.variants.items():
        fractions = np.stack([run.linear_fraction.mean(axis=1) for run in runs])
        mean, std = fractions.mean(axis=0), fractions.std(axis=0)
        line, = axes.plot(runs[0].checkpoint_steps, mean, marker="o", label=variant)
        axes.fill_between(runs[0].checkpoint_steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes.set(ylim=(-0.02, 1.02), xlabel="training step", ylabel="units in a linear regime (mean over layers)",
             title=f"{comparison.experiment} on {comparison.task}: layer linearization on the probe set")
    axes.title.set_fontsize(9)
    axes.legend()
    figure.savefig(path, dpi=100)

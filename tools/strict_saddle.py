"""`keras-embed experiment strict-saddle`: the width paper's Fig. 3, run here.

Writes results.json (every row with its eigenvalues), table.md and spectra.png into
--output-dir and prints the table.

Example:
    keras-embed experiment strict-saddle -o build/strict_saddle
"""

import json
from pathlib import Path

import click

from keras_embed.tools.common import FiniteFloat, device_option, handles_errors, place_computation, table

FILES = ("results.json", "table.md", "spectra.png")
COLUMNS = ("network", "width", "params", "loss", "grad_norm", "negative", "zero", "positive")


@click.command("strict-saddle")
@click.option("-o", "--output-dir", default="strict_saddle", show_default=True,
              type=click.Path(file_okay=False, path_type=str), help=f"Folder for {', '.join(FILES)}.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier run in --output-dir.")
@click.option("--zero-rtol", type=FiniteFloat(min=0, min_open=True), default=1e-10, show_default=True,
              help="An eigenvalue counts as zero when |lambda| <= this times the network's largest |lambda|.")
@device_option
@handles_errors
def strict_saddle(output_dir, overwrite, zero_rtol, device):
    """Split one neuron of width-2 networks at a critical point and count Hessian eigenvalues.

    A tanh network on the synthetic 1-D task and a sigmoid network on Iris (MSE on
    one-hot classes, and on the class index) are brought to a critical point in float64
    (gradient norm below 1e-8); one hidden neuron is split equally into 2 and 3 copies.
    Expected (width paper, Theorems 1 and 2; long version, Theorem 6.2): the gradient stays
    zero, the zero count grows by one per split, the negative count never decreases.
    One line per network says whether that held.

    \b
    Exit codes: 0 ok (whatever the verdicts), 2 bad usage or output folder.
    """
    from keras_embed.experiments.strict_saddle import strict_saddle as run

    folder = _check_folder(Path(output_dir), overwrite)
    placed = place_computation(device)
    result = {**run(rtol=zero_rtol), "device": placed}
    click.echo(table([_cells(row) for row in result["rows"]], COLUMNS))
    click.echo(verdicts(result))
    _write(result, folder)
    click.echo(f"{result['seconds']} s; wrote {', '.join(FILES)} to {folder}")


def _check_folder(folder, overwrite):
    """Refuses, before the work, a folder whose files cannot be replaced (see `io.check_side_output`)."""
    import os

    from keras_embed.errors import InputError
    from keras_embed.files.save import check_side_output, special_kind

    if folder.is_dir():
        if any(folder.iterdir()) and not overwrite:
            raise InputError(f"output folder '{folder}' is not empty; pass --overwrite to replace an earlier run's files")
        for name in FILES:
            check_side_output(folder / name, overwrite=True)
    elif os.path.lexists(folder) and special_kind(folder) is None:
        raise InputError(f"'{folder}' is a file; give a folder for the results")
    else:
        check_side_output(folder)  # a new folder there: a device or FIFO is refused, its parent must take it
    return folder


def _cells(row):
    return {**row, "loss": f"{row['loss']:.6g}", "grad_norm": f"{row['grad_norm']:.1e}"}


def verdicts(result):
    """One line per network: criticality, the zero and negative counts along the splits."""
    lines = []
    for name, check in result["checks"].items():
        zeros = ", ".join(f"{step:+d}" for step in check["zero_steps"])
        negatives = " -> ".join(str(count) for count in check["negative_counts"])
        held = "held" if check["expected_pattern"] else "did NOT hold"
        lines.append(f"{name}: gradient norm {'below' if check['critical'] else 'NOT below'} "
                     f"{result['critical_gradient']:g} at every width; zero count {zeros} per split; "
                     f"negative count {negatives}; expected pattern {held}")
    return "\n".join(lines)


def markdown(result):
    """The table as markdown, with the verdicts under it."""
    rows = [_cells(row) for row in result["rows"]]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[column]) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in verdicts(result).splitlines()) + "\n"


def _write(result, folder):
    import io

    from keras_embed.files.save import published_together, write_bytes, write_text, write_errors

    png = io.BytesIO()
    plot(result).savefig(png, format="png", dpi=100)
    created = not folder.is_dir()
    with write_errors(folder):
        folder.mkdir(exist_ok=True)
    try:
        with published_together():
            write_text(folder / "results.json", json.dumps(result, indent=1) + "\n")
            write_text(folder / "table.md", markdown(result))
            write_bytes(folder / "spectra.png", png.getvalue())
    except BaseException:
        if created:
            folder.rmdir()  # nothing was published into it
        raise


def plot(result):
    """|eigenvalues| by rank, log scale, one panel per network and one series per width;
    negative eigenvalues are marked, the zero threshold is dashed."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend or window

    names = list(result["checks"])
    figure = Figure(figsize=(4.2 * len(names), 3.8), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        for row in (row for row in result["rows"] if row["network"] == name):
            values = np.asarray(row["eigenvalues"])
            order = np.argsort(-np.abs(values))
            magnitude = np.maximum(np.abs(values[order]), 1e-30)
            negative = values[order] < -row["zero_threshold"]
            rank = np.arange(1, len(values) + 1)
            line, = axes.plot(rank, magnitude, marker="o", markersize=3, linewidth=0.8, label=f"width {row['width']}")
            axes.scatter(rank[negative], magnitude[negative], marker="v", s=40, facecolors="none", edgecolors=line.get_color())
            axes.axhline(row["zero_threshold"], color=line.get_color(), linestyle="--", linewidth=0.6)
        axes.set(yscale="log", xlabel="rank by |eigenvalue|", ylabel="|eigenvalue|", title=name)
        axes.title.set_fontsize(10)
        axes.legend(title="open triangles: negative", fontsize=8, title_fontsize=8)
    return figure

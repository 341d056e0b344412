"""`keras-embed landscape`: the taxonomy paper's global metrics for two or more trained models.

Example:
    keras-embed landscape seed0.keras seed1.keras seed2.keras --dataset digits \\
        --loss sparse_categorical_crossentropy --from-logits --align --json landscape.json --plot paths.png
"""

import click

from keras_embed.tools.common import (calibration_data, data_options, device_option, handles_errors,
                                      json_output_option, place_computation, unsafe_option, write_json)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str))
@data_options
@click.option("--loss", required=True, help="Keras loss name of the training loss (as for `keras-embed hessian`).")
@click.option("--from-logits", is_flag=True, help="The models output logits (cross-entropy losses).")
@click.option("--layer", "layers", multiple=True, metavar="NAME",
              help="Also compare this hidden layer's outputs by CKA (repeatable; the name in every model).")
@click.option("--align", "align_units", is_flag=True,
              help="Also match each pair's hidden units (activation correlation, an assignment problem) and report "
                   "the distance and both paths after matching.")
@click.option("--points", type=click.IntRange(min=3), default=5, show_default=True,
              help="Values of t evaluated on each path, ends included (the paper: 5).")
@click.option("--curve-epochs", type=click.IntRange(min=0), default=50, show_default=True,
              help="Epochs of SGD (lr 0.01, momentum 0.9) training the Bézier curve's bend (the paper: 50).")
@click.option("--hessian-rows", type=click.IntRange(min=1), default=200, show_default=True,
              help="Rows of the data the Hessian's top eigenvalue and trace are measured on (the paper: 200).")
@click.option("--trace-samples", type=click.IntRange(min=1), default=50, show_default=True,
              help="Rademacher vectors of the Hutchinson trace estimate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the curve training and the estimates.")
@json_output_option("every figure")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str),
              help="Write a PNG of the loss along the linear path and the Bézier curve of every pair.")
@click.option("--overwrite", is_flag=True, help="Replace existing --json and --plot files.")
@unsafe_option
@device_option
@handles_errors
def landscape(models, data, dataset, batch_size, max_samples, loss, from_logits, layers, align_units, points,
              curve_epochs, hessian_rows, trace_samples, seed, json_path, plot_path, overwrite, unsafe, device):
    """Local and global landscape metrics of MODELS (two or more of one architecture).

    Per model: loss and error on the data, Hessian top eigenvalue and trace. Per pair:
    linear CKA of the outputs (and of each --layer), the L2 distance of the weights, the
    loss and error along the linear path and along a quadratic Bézier curve trained between
    them, with the paper's mode connectivity mc = (err(0)+err(1))/2 - err(u) (below 0: a
    barrier) and the linear path's loss barrier; BatchNormalization statistics are
    recomputed at every point. The data (--data with labels y, or --dataset) should be the
    models' training data, as in the paper.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 4 unsupported model (--align).
    """
    placed = place_computation(device)
    from keras_embed.files.load import load_model
    from keras_embed.files.save import check_side_output
    from keras_embed.landscape.compare import compare_models

    if len(models) < 2:
        raise click.UsageError("give two or more models of one architecture")
    if data is None and dataset is None:
        raise click.UsageError("the loss needs data with labels: give --data (an .npz with x and y) or --dataset")
    for path in (json_path, plot_path):
        if path not in (None, "-"):
            check_side_output(path, *models, *(other for other in (json_path, plot_path) if other not in (None, "-", path)),
                              overwrite=overwrite)
    loaded = [load_model(path, unsafe) for path in models]
    x, y = calibration_data(data, dataset, loaded[0], max_samples)
    figures = compare_models(loaded, x, y, loss, from_logits, layers, align_units, points, curve_epochs, hessian_rows,
                             trace_samples, seed, batch_size)
    figures["models"] = [{**row, "path": path} for row, path in zip(figures["models"], models)]
    figures["device"] = placed
    if plot_path is not None:
        _write_plot(figures, plot_path)
    click.echo(summary(figures), err=json_path == "-")
    write_json(figures, json_path)


def _write_plot(figures, path):
    import io

    from keras_embed.experiments.report import figure_and_panels
    from keras_embed.files.save import write_bytes

    figure, panels = figure_and_panels(2)
    for axes, kind, title in zip(panels, ("linear", "bezier"), ("linear path", "quadratic Bézier curve (trained)")):
        for pair in figures["pairs"]:
            label = f"{pair['first']}-{pair['second']}"
            line, = axes.plot([p["t"] for p in pair[kind]["points"]], [p["loss"] for p in pair[kind]["points"]],
                              marker="o", label=label)
            if "aligned" in pair:
                aligned = pair["aligned"][kind]["points"]
                axes.plot([p["t"] for p in aligned], [p["loss"] for p in aligned], marker="x", linestyle="--",
                          color=line.get_color(), label=f"{label} aligned")
        axes.set(xlabel="t", ylabel=f"{figures['settings']['loss']} loss", title=f"loss along the {title}")
        axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes(path, buffer.getvalue())


def _row(name, part):
    return f"{name:<10} distance {part['distance']:9.4g}   linear mc {part['linear']['mc']:8.3g}   " \
           f"linear barrier {part['linear']['barrier']:8.3g}   Bézier mc {part['bezier']['mc']:8.3g}"


def summary(figures):
    """Per model and per pair, the metrics as a few lines of text."""
    on = "error %" if figures["mc_on"] == "error" else "loss"
    lines = [f"{len(figures['models'])} models on {figures['settings']['rows']} rows; mc on the {on}, "
             f"{figures['settings']['points']} points per path"]
    for index, row in enumerate(figures["models"]):
        error = "" if row["error"] is None else f"   error {row['error']:.3g}%"
        lines.append(f"model {index} ({row['path']}): loss {row['loss']:.4g}{error}   Hessian top eigenvalue "
                     f"{row['hessian_top']:.4g}   trace {row['hessian_trace']:.4g} +- {row['hessian_trace_error']:.2g}")
    for pair in figures["pairs"]:
        cka = "".join(f"   CKA {name} {value:.4f}" for name, value in pair["cka"].items())
        lines.append(f"pair {pair['first']}-{pair['second']}: CKA output {pair['cka_output']:.4f}{cka}")
        lines.append("  " + _row("raw", pair))
        if "aligned" in pair:
            lines.append("  " + _row("aligned", pair["aligned"]))
    return "\n".join(lines)

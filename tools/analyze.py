"""`keras-embed analyze`: per-layer table of exactly redundant units."""

import json

import click

from keras_embed.tools.common import calibration_data, data_options, handles_errors, progress, table, unsafe_option

COLUMNS = ("layer", "width", "zero_out", "constant", "duplicate_groups", "duplicates", "effective_width")
DATA_COLUMNS = ("layer", "width", "zero_out", "dead", "constant", "duplicate_groups", "duplicates",
                "linear_fraction", "collapsed", "effective_width")


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the table as JSON to this path ('-' for stdout).")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-6, show_default=True, help="Relative tolerance for zero and equal weights.")
@click.option("--lin-tol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Affine-fit residual sqrt(1-R^2) below which a smooth unit counts as linear on the data.")
@data_options
@unsafe_option
@handles_errors
def analyze(model, json_path, rtol, lin_tol, data, dataset, batch_size, unsafe):
    """Show the redundant units of each Dense layer of MODEL (.keras or .h5).

    Zero-out units have all-zero outgoing weights, constant units all-zero incoming
    weights, duplicates the same incoming weights and bias as another unit (or a positive
    multiple, for relu, leaky_relu and linear). With --data or --dataset it also shows
    units dead or constant on the data and the fraction of units in a linear regime;
    layers whose units are all linear collapse. The effective width is what `prune` keeps.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 4 unsupported model.
    """
    from keras_embed.compress import analyze as analyze_graph
    from keras_embed.io import check_side_output, load_model, write_text
    from keras_embed.read import read_model
    from keras_embed.stats import collect

    if json_path not in (None, "-"):
        check_side_output(json_path, model, overwrite=True)  # the table is regenerated on every run
    original = load_model(model, unsafe)
    graph = read_model(original)
    x, _ = calibration_data(data, dataset, original)
    stats = None
    if x is not None:
        with progress(len(x), "statistics") as bar:
            stats = collect(graph, x, batch_size, gram=False, on_batch=bar.update)
    rows = analyze_graph(graph, stats, rtol, lin_tol)
    text = json.dumps({"model": model, "layers": rows}, indent=2)
    click.echo(table(rows, COLUMNS if stats is None else DATA_COLUMNS), err=json_path == "-")
    if json_path == "-":
        click.echo(text)
    elif json_path:
        write_text(json_path, text + "\n")

"""`keras-embed analyze`: per-layer table of exactly redundant units."""

import json

import click

from keras_embed.tools.common import calibration_data, data_options, handles_errors, progress, table, unsafe_option

COLUMNS = ("layer", "width", "zero_out", "constant", "duplicate_groups", "duplicates", "effective_width")
NETWORK_COLUMNS = ("name", "kind", "width_before", "width_after", "channels_removed", "linearized")
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
    """Show the redundant units (channels) of each Dense (Conv2D) layer of MODEL.

    Zero-out units have all-zero outgoing weights, constant units all-zero incoming
    weights, duplicates the same incoming weights and bias as another unit (or a positive
    multiple, for relu, leaky_relu and linear). With --data or --dataset it also shows
    units dead or constant on the data and the fraction of units in a linear regime;
    layers whose units are all linear collapse. The effective width is what `prune` keeps.
    Convolutional and branching models: channels per Dense/Conv2D layer before and after
    the rules, and the share linear on the data.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 4 unsupported model.
    """
    from keras_embed.compress import analyze as analyze_graph
    from keras_embed.io import check_side_output, load_model, write_text
    from keras_embed.network import read_network
    from keras_embed.prune_network import reduce_network
    from keras_embed.read import read_chain
    from keras_embed.stats import collect

    if json_path not in (None, "-"):
        check_side_output(json_path, model, overwrite=True)  # the table is regenerated on every run
    original = load_model(model, unsafe)
    x, _ = calibration_data(data, dataset, original)
    graph = read_chain(original)
    if graph is not None:
        stats = None
        if x is not None:
            with progress(len(x), "statistics") as bar:
                stats = collect(graph, x, batch_size, gram=False, on_batch=bar.update)
        rows, columns = analyze_graph(graph, stats, rtol, lin_tol), COLUMNS if stats is None else DATA_COLUMNS
    else:
        with progress(0 if x is None else len(x), "statistics") as bar:
            reduction = reduce_network(read_network(original), x, rtol, lin_tol, batch_size=batch_size, on_batch=bar.update)
        rows, columns = reduction.layers(), NETWORK_COLUMNS
    text = json.dumps({"model": model, "layers": rows}, indent=2)
    click.echo(table(rows, columns), err=json_path == "-")
    if json_path == "-":
        click.echo(text)
    elif json_path:
        write_text(json_path, text + "\n")

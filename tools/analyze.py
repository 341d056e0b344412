"""`keras-embed analyze`: per-layer table of redundant channels."""

import json

import click

from keras_embed.tools.common import (FiniteFloat, calibration_data, data_options, device_option, handles_errors,
                                      place_computation, progress, start_strategy, strategy_option, table,
                                      unsafe_option)

COLUMNS = ("name", "kind", "width_before", "zero_out", "constant", "duplicate_groups", "duplicates", "effective_width")
DATA_COLUMNS = ("name", "kind", "width_before", "zero_out", "dead", "constant", "duplicate_groups", "duplicates",
                "linear_fraction", "collapsed", "effective_width")


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the table as JSON to this path ('-' for stdout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file; without it an existing one is an error (exit 2).")
@click.option("--rtol", type=FiniteFloat(min=0), default=1e-6, show_default=True, help="Relative tolerance for zero and equal weights.")
@click.option("--lin-tol", type=FiniteFloat(min=0), default=1e-4, show_default=True,
              help="Affine-fit residual sqrt(1-R^2) below which a smooth unit counts as linear on the data.")
@data_options
@strategy_option
@device_option
@unsafe_option
@handles_errors
def analyze(model, json_path, overwrite, rtol, lin_tol, data, dataset, batch_size, max_samples, strategy, device, unsafe):
    """Show the redundant channels of each Dense and convolution layer of MODEL.

    Zero-out channels have all-zero outgoing weights, constant channels all-zero incoming
    weights, duplicates the same incoming weights and bias as another channel (or a
    positive multiple, on relu, leaky_relu and linear paths). With --data or --dataset it
    also shows channels dead or constant on the data and the share of channels in a
    linear regime; layers whose channels are all linear collapse. The effective width is
    what `prune` keeps. Layers an Add joins form one group and share their counts (the
    group column names it).

    With --strategy, the statistics pass shares each batch across the replicas of a
    tf.distribute strategy; with multi-worker, only the chief writes --json.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 4 unsupported model.
    """
    placed = place_computation(device, strategy)
    strategy, shared, writes = start_strategy(strategy)
    from keras_embed.files.data import row_count
    from keras_embed.files.load import load_model
    from keras_embed.files.save import check_side_output, write_text
    from keras_embed.pipeline import analyze as analyze_model

    if json_path not in (None, "-"):
        check_side_output(json_path, model, overwrite=overwrite)
    original = load_model(model, unsafe)
    x, _ = calibration_data(data, dataset, original, max_samples)
    with progress(0 if x is None else row_count(x), "statistics") as bar:
        rows = analyze_model(original, x, rtol, lin_tol, batch_size=batch_size, on_batch=bar.update, strategy=strategy)
    columns = COLUMNS if x is None else DATA_COLUMNS
    if any(row["group"] != row["name"] for row in rows):
        columns = columns[:2] + ("group",) + columns[2:]
    text = json.dumps({"model": model, "layers": rows, "device": placed, **({"strategy": shared} if shared else {})}, indent=2)
    click.echo(table(rows, columns), err=json_path == "-")
    if json_path == "-":
        click.echo(text)
    elif json_path and writes:
        write_text(json_path, text + "\n")

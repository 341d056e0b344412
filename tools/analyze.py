"""`keras-embed analyze`: per-layer table of exactly redundant units."""

import json

import click

from keras_embed.tools.common import UNSAFE_HELP, handles_errors, table

COLUMNS = ("layer", "width", "zero_out", "constant", "duplicate_groups", "duplicates", "effective_width")


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the table as JSON to this path ('-' for stdout).")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-6, show_default=True, help="Relative tolerance for zero and equal weights.")
@click.option("--unsafe", is_flag=True, help=UNSAFE_HELP)
@handles_errors
def analyze(model, json_path, rtol, unsafe):
    """Show the redundant units of each Dense layer of MODEL (.keras or .h5).

    Zero-out units have all-zero outgoing weights, constant units all-zero incoming
    weights, duplicates the same incoming weights and bias as another unit (or a positive
    multiple, for relu, leaky_relu and linear). The effective width is what `prune` keeps.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 4 unsupported model.
    """
    from keras_embed.io import check_side_output, load_model, write_text
    from keras_embed.compress import analyze as analyze_graph
    from keras_embed.read import read_model

    if json_path not in (None, "-"):
        check_side_output(json_path, model)
    rows = analyze_graph(read_model(load_model(model, unsafe)), rtol)
    text = json.dumps({"model": model, "layers": rows}, indent=2)
    click.echo(table(rows, COLUMNS), err=json_path == "-")
    if json_path == "-":
        click.echo(text)
    elif json_path:
        write_text(json_path, text + "\n")

"""`keras-embed prune`: remove exactly redundant units, verify, export."""

import json

import click

from keras_embed.tools.common import UNSAFE_HELP, handles_errors, load_inputs, table


def output_options(command):
    """Options every command that writes a model shares."""
    for option in reversed([
        click.option("-o", "--output", required=True, type=click.Path(path_type=str),
                     help="Where to write the model: .keras, .h5, .tflite, or a folder ending in / for a SavedModel."),
        click.option("--format", "format_", type=click.Choice(["keras", "h5", "savedmodel", "tflite"]),
                     help="Output format, when the extension does not say."),
        click.option("--atol", type=click.FloatRange(min=0), help="Largest allowed max abs output difference [default: 1e-4 times the output scale]."),
        click.option("--data", type=click.Path(dir_okay=False, path_type=str),
                     help="Calibration inputs (.npy, or .npz with key x) [default: 1024 seeded standard-normal inputs]."),
        click.option("--unsafe", is_flag=True, help=UNSAFE_HELP),
    ]):
        command = option(command)
    return command


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@output_options
@click.option("--report", type=click.Path(dir_okay=False, path_type=str), help="Write the JSON report to this path.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (the table goes to stderr).")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-6, show_default=True, help="Relative tolerance for zero and equal weights.")
@click.option("--force", is_flag=True, help="Write the model even if verification fails.")
@handles_errors
def prune(model, output, format_, atol, data, unsafe, report, as_json, rtol, force):
    """Remove exactly redundant units from MODEL and write the narrower model to OUTPUT.

    Zero-out units are dropped, constant units folded into the next bias, duplicate units
    merged. The outputs of both models are compared on calibration inputs; above --atol
    nothing is written and the exit code is 3.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 3 verification failed, 4 unsupported model.
    """
    from keras_embed.compress import prune as prune_model
    from keras_embed.io import check_output, check_side_output, load_model, save_model, write_text

    format_ = check_output(output, model, format_)
    if report:
        check_side_output(report, model, output)
    original = load_model(model, unsafe)
    pruned, result = prune_model(original, rtol, load_inputs(data, original), atol, force)
    figures = result.to_dict()
    text = json.dumps(figures, indent=2)
    save_model(pruned, output, format_)
    if report:
        write_text(report, text + "\n")
    click.echo(summary(figures), err=as_json)
    if as_json:
        click.echo(text)


def summary(figures):
    """Before/after table and the figures that prove the outputs held."""
    removed = ", ".join(f"{count} {kind.replace('_', '-')}" for kind, count in figures["removed"].items())
    return "\n".join([
        table(figures["layers"], ("name", "width_before", "width_after")),
        f"params: {figures['params_before']} -> {figures['params_after']}   removed units: {removed}",
        f"max abs output difference: {figures['max_abs_diff']:.3g} (atol {figures['atol']:.3g}, "
        f"on {figures['calibration']})",
    ])

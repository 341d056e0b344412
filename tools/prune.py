"""`keras-embed prune`: remove exactly redundant units, verify, export."""

import json

import click

from keras_embed.tools.common import calibration_data, data_options, handles_errors, output_options, progress, table


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@output_options
@data_options
@click.option("--validation", type=click.Path(dir_okay=False, path_type=str),
              help="Held-out inputs (.npy or .npz) the outputs must match on as well.")
@click.option("--lin-tol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Affine-fit residual sqrt(1-R^2) below which a smooth unit counts as linear on the data.")
@click.option("--allow-growth", is_flag=True, help="Collapse linearized layers even when the merged layer has more weights.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=str), help="Write the JSON report to this path.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (the table goes to stderr).")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-6, show_default=True, help="Relative tolerance for zero and equal weights.")
@click.option("--force", is_flag=True, help="Write the model even if verification fails.")
@handles_errors
def prune(model, output, format_, atol, unsafe, data, dataset, batch_size, validation, lin_tol, allow_growth,
          report, as_json, rtol, force):
    """Remove redundant units and layers from MODEL and write the smaller model to OUTPUT.

    From the weights: zero-out units are dropped, constant units folded into the next
    bias, duplicate units merged, and layers with a linear activation composed into the
    next. With --data or --dataset, also from the data: units dead or constant on it are
    removed and layers that compute linearly on it are collapsed; the result then
    matches MODEL on that data (and on --validation), not necessarily elsewhere.

    The outputs of both models are compared on the calibration data (default 1024 seeded
    standard-normal inputs); above --atol nothing is written and the exit code is 3.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 3 verification failed, 4 unsupported model.
    """
    from keras_embed.compress import prune as prune_model
    from keras_embed.io import check_output, check_side_output, load_model, save_model, write_text

    from keras_embed.data import check_inputs, load_array

    format_ = check_output(output, model, format_)
    if report:
        check_side_output(report, model, output)
    original = load_model(model, unsafe)
    x = calibration_data(data, dataset, original)
    held_out = None if validation is None else check_inputs(load_array(validation), original)
    with progress(0 if x is None else len(x), "statistics") as bar:
        pruned, result = prune_model(
            original, rtol, x, atol, force, validation=held_out, lin_tol=lin_tol,
            allow_growth=allow_growth, batch_size=batch_size, on_batch=bar.update,
        )
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
    lines = [
        table(figures["layers"], ("name", "width_before", "width_after", "linearized")),
        f"params: {figures['params_before']} -> {figures['params_after']}   "
        f"depth: {figures['depth_before']} -> {figures['depth_after']}   removed units: {removed}",
    ]
    if figures["collapsed_layers"]:
        lines.append(f"collapsed linearized layers: {', '.join(figures['collapsed_layers'])}")
    if figures["not_collapsed_would_grow"]:
        lines.append(f"linearized but kept (merging would grow; --allow-growth): {', '.join(figures['not_collapsed_would_grow'])}")
    lines.append(f"max abs output difference: {figures['max_abs_diff']:.3g} (atol {figures['atol']:.3g}, on {figures['calibration']})")
    if figures["max_abs_diff_validation"] is not None:
        lines.append(f"max abs output difference on validation data: {figures['max_abs_diff_validation']:.3g}")
    return "\n".join(lines)

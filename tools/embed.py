"""`keras-embed embed`: grow a model without changing what it computes."""

import math

import click

from keras_embed.tools.common import (FiniteFloat, calibration_data, data_options, device_option, handles_errors,
                                      output_options, place_computation, table)


def _parse(spec, option, form, numbers):
    """(layer, *numbers) of a spec LAYER[:N...]; `numbers` are (type, default) pairs, a
    default of None marking a required number."""
    layer, *parts = spec.split(":")
    if not sum(default is None for _, default in numbers) <= len(parts) <= len(numbers):
        raise click.BadParameter(f"expected {option} in the form {form}. Received: {spec!r}", param_hint=option)
    try:
        values = [kind(part) for (kind, _), part in zip(numbers, parts)]
    except ValueError:
        raise click.BadParameter(f"expected numbers after the layer in {option} {form}. Received: {spec!r}",
                                 param_hint=option) from None
    if not all(math.isfinite(value) for value in values):
        raise click.BadParameter(f"{parts[-1]!r} is not a finite number. Received: {spec!r}", param_hint=option)
    return (layer, *values, *(default for _, default in numbers[len(parts):]))


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@output_options
@data_options
@click.option("--widen", "widen_specs", multiple=True, metavar="LAYER:UNIT[:ALPHA]",
              help="Split channel UNIT of hidden LAYER (name or index; every layer an Add joins to it too) into two; "
                   "the copy takes ALPHA of its outgoing weights [default alpha 0.5]. Repeatable.")
@click.option("--null", "null_specs", multiple=True, metavar="LAYER[:BIAS]",
              help="Add a channel with zero incoming and outgoing weights and bias BIAS [default 0] to hidden LAYER. Repeatable.")
@click.option("--deepen", "deepen_layers", multiple=True, metavar="LAYER",
              help="Insert after hidden LAYER a pointwise relu layer that is the identity on the calibration data "
                   "(critical lifting); needs --data or --dataset. Repeatable.")
@click.option("--margin", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True,
              help="Smallest pre-activation of a --deepen layer on the data.")
@device_option
@handles_errors
def embed(model, output, format_, overwrite, atol, unsafe, data, dataset, batch_size, max_samples, widen_specs, null_specs,
          deepen_layers, margin, device):
    """Grow MODEL by the Embedding Principle's embeddings; the outputs stay the same.

    --widen splits a channel of a Dense or convolution layer (in every layer an Add
    couples to it), --null adds a channel no layer reads, --deepen inserts an identity
    relu layer (Dense, or a 1x1 convolution) after a layer read by one Dense or convolution.

    All --widen steps run first, in order, then all --null steps, then all --deepen steps.
    Widening keeps the outputs for every input; deepening keeps them on the calibration
    data. The result is checked against MODEL on the calibration data (default 1024
    seeded standard-normal inputs) like `prune` output.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 3 verification failed, 4 unsupported model.
    """
    placed = place_computation(device)
    from keras_embed.files.load import load_model
    from keras_embed.files.save import check_output, save_model
    from keras_embed.pipeline import embed as embed_model

    widen_steps = [_parse(spec, "--widen", "LAYER:UNIT[:ALPHA]", ((int, None), (float, 0.5))) for spec in widen_specs]
    null_steps = [_parse(spec, "--null", "LAYER[:BIAS]", ((float, 0.0),)) for spec in null_specs]
    if not widen_steps and not null_steps and not deepen_layers:
        raise click.UsageError("nothing to do: give at least one --widen, --null or --deepen")
    if deepen_layers and data is None and dataset is None:
        raise click.UsageError("--deepen needs calibration data: give --data or --dataset")
    format_ = check_output(output, model, format_, overwrite)
    original = load_model(model, unsafe)
    x, _ = calibration_data(data, dataset, original, max_samples)
    try:
        grown, figures = embed_model(original, widen_steps, null_steps, deepen_layers, x, margin, atol, batch_size)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    save_model(grown, output, format_)
    click.echo(table(figures["layers"], ("name", "width_before", "width_after")))
    click.echo(f"params: {figures['params_before']} -> {figures['params_after']}   max abs output difference: "
               f"{figures['max_abs_diff']:.3g} (atol {figures['atol']:.3g})   device: {placed['used']}")

"""`keras-embed embed`: grow a model without changing what it computes."""

import click

from keras_embed.tools.common import calibration_data, data_options, handles_errors, output_options, table


def _layer(graph, text):
    """A hidden layer given by name, or by index when no layer has that name."""
    names = [layer.name for layer in graph.layers]
    return int(text) if text not in names and text.isdigit() else text


def _parse(spec, option, fields):
    parts = spec.split(":")
    if not 1 <= len(parts) - fields[0] <= fields[1]:
        raise click.BadParameter(f"expected {option} in the form {fields[2]}. Received: {spec!r}", param_hint=option)
    return parts


def _rows(before, after):
    """Table rows: width of every layer of `after`, and of `before` where it had it."""
    return [{"name": name, "width_before": before.get(name, "(new)"), "width_after": width} for name, width in after.items()]


def _grow_chain(graph, widen_steps, null_steps, deepen_layers, x, margin, batch_size):
    """Embeds a Dense chain (its `Graph`); returns (grown model, table rows)."""
    from keras_embed.build import build_model
    from keras_embed.operators import add_null, deepen, widen
    from keras_embed.stats import collect

    before = graph
    for layer, unit, *alpha in widen_steps:
        graph = widen(graph, _layer(graph, layer), int(unit), float(alpha[0]) if alpha else 0.5)
    for layer, *bias in null_steps:
        graph = add_null(graph, _layer(graph, layer), float(bias[0]) if bias else 0.0)
    for layer in deepen_layers:
        name = graph.layers[graph.hidden_index(_layer(graph, layer))].name
        lower = collect(graph, x, batch_size, gram=False).layers[name].a_min
        graph = deepen(graph, name, lower, margin)
    widths = {layer.name: layer.width for layer in before.layers}
    return build_model(graph), _rows(widths, {layer.name: layer.width for layer in graph.layers})


def _grow_network(original, widen_steps, null_steps, deepen_layers, x, margin, batch_size):
    """Embeds a convolutional or branching model; returns (grown model, table rows)."""
    from keras_embed.channel_operators import deepen_after, output_minimum, widen_channel
    from keras_embed.network import PRODUCERS, build_network, read_network

    if null_steps:
        raise ValueError("--null supports chains of Dense layers only; use --widen for convolutional or branching models")
    network = before = read_network(original)
    for layer, unit, *alpha in widen_steps:
        network = widen_channel(network, layer, int(unit), float(alpha[0]) if alpha else 0.5)
    for layer in deepen_layers:
        network = deepen_after(network, layer, output_minimum(network, layer, x, batch_size), margin)
    widths = [{node.name: node.width for node in item.nodes if node.kind in PRODUCERS} for item in (before, network)]
    return build_network(network), _rows(*widths)


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@output_options
@data_options
@click.option("--widen", "widen_specs", multiple=True, metavar="LAYER:UNIT[:ALPHA]",
              help="Split UNIT of hidden LAYER (name or index) into two; the copy takes ALPHA of its outgoing weights [default alpha 0.5]. Repeatable.")
@click.option("--null", "null_specs", multiple=True, metavar="LAYER[:BIAS]",
              help="Add a unit with zero incoming and outgoing weights and bias BIAS [default 0] to hidden LAYER. Repeatable.")
@click.option("--deepen", "deepen_layers", multiple=True, metavar="LAYER",
              help="Insert after hidden LAYER a relu layer that is the identity on the calibration data (critical lifting); needs --data or --dataset. Repeatable.")
@click.option("--margin", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Smallest pre-activation of a --deepen layer on the data.")
@handles_errors
def embed(model, output, format_, overwrite, atol, unsafe, data, dataset, batch_size, widen_specs, null_specs,
          deepen_layers, margin):
    """Grow MODEL by the Embedding Principle's embeddings; the outputs stay the same.

    Convolutional and branching models: --widen splits a channel of a Dense or Conv2D
    layer (with every layer an Add couples to it), --deepen inserts an identity 1x1
    Conv2D with relu after a Conv2D read by one Dense/Conv2D layer; --null is for Dense chains.

    All --widen steps run first, in order, then all --null steps, then all --deepen steps.
    Widening keeps the outputs for every input; deepening keeps them on the calibration
    data. The result is checked against MODEL on the calibration data (default 1024
    seeded standard-normal inputs) like `prune` output.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 3 verification failed, 4 unsupported model.
    """
    from keras_embed.io import check_output, load_model, save_model
    from keras_embed.read import read_chain
    from keras_embed.verify import assert_outputs_preserved, calibration_inputs

    widen_steps = [_parse(spec, "--widen", (1, 2, "LAYER:UNIT[:ALPHA]")) for spec in widen_specs]
    null_steps = [_parse(spec, "--null", (0, 2, "LAYER[:BIAS]")) for spec in null_specs]
    if not widen_steps and not null_steps and not deepen_layers:
        raise click.UsageError("nothing to do: give at least one --widen, --null or --deepen")
    if deepen_layers and data is None and dataset is None:
        raise click.UsageError("--deepen needs calibration data: give --data or --dataset")
    format_ = check_output(output, model, format_, overwrite)
    original = load_model(model, unsafe)
    x, _ = calibration_data(data, dataset, original)
    graph = read_chain(original)
    grow, source = (_grow_chain, graph) if graph is not None else (_grow_network, original)
    try:
        grown, rows = grow(source, widen_steps, null_steps, deepen_layers, x, margin, batch_size)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    diff, tolerance = assert_outputs_preserved(original, grown, calibration_inputs(original) if x is None else x, atol)
    save_model(grown, output, format_)
    click.echo(table(rows, ("name", "width_before", "width_after")))
    click.echo(f"params: {original.count_params()} -> {grown.count_params()}   max abs output difference: {diff:.3g} (atol {tolerance:.3g})")

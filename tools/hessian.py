"""`keras-embed hessian`: gradient norm, Hessian eigenvalues and trace of a model's loss on data.

Example:
    keras-embed hessian model.keras --dataset iris --loss sparse_categorical_crossentropy --full
    keras-embed hessian model.keras --data train.npz --loss mse --top-k 10 --json hessian.json
"""

import click

from keras_embed.tools.common import (FiniteFloat, calibration_data, data_options, device_option, handles_errors,
                                      json_output_option, place_computation, unsafe_option, write_json)


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@data_options
@click.option("--loss", required=True,
              help="Keras loss name, e.g. mse, binary_crossentropy, categorical_crossentropy, "
                   "sparse_categorical_crossentropy. The mean over the data is analyzed (no regularization terms).")
@click.option("--from-logits", is_flag=True, help="The model outputs logits (cross-entropy losses).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Lanczos: eigenvalues computed at each end of the spectrum.")
@click.option("--full", is_flag=True,
              help="Form the full Hessian (up to 5000 weights) for the whole spectrum, exact counts and trace.")
@click.option("--zero-rtol", type=FiniteFloat(min=0), default=1e-10, show_default=True,
              help="An eigenvalue counts as zero when |lambda| <= this times the largest |lambda|.")
@click.option("--trace-samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Rademacher vectors of the Hutchinson trace estimate (without --full).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the Lanczos start and the Hutchinson vectors.")
@json_output_option("the figures")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
@unsafe_option
@device_option
@handles_errors
def hessian(model, data, dataset, batch_size, max_samples, loss, from_logits, top_k, full, zero_rtol, trace_samples, seed,
            json_path, overwrite, unsafe, device):
    """Gradient norm and Hessian spectrum of the loss of MODEL on the data, in float64.

    The loss is the mean of --loss over the data (--data with labels y, or --dataset),
    computed on a float64 copy of MODEL. Hessian-vector products come from double
    backpropagation; Lanczos gives the --top-k largest and smallest eigenvalues (the
    counts are then of those only), --full the whole spectrum. A critical point has a
    gradient norm near 0; a negative eigenvalue there makes it a strict saddle.

    \b
    JSON keys: grad_norm, loss, eigenvalues (those computed, ascending), negative, zero,
    positive, zero_threshold, counts_complete, trace, trace_method, trace_error, params,
    samples, method, dtype, device.
    Exit codes: 0 ok, 2 bad usage or input, 4 unsupported model.
    """
    placed = place_computation(device)
    from keras_embed.hessian import EmpiricalRisk, analyze_hessian, cast_model, get_loss
    from keras_embed.files.load import load_model
    from keras_embed.files.save import check_side_output

    if data is None and dataset is None:
        raise click.UsageError("the loss needs data with labels: give --data (an .npz with x and y) or --dataset")
    if json_path not in (None, "-"):
        check_side_output(json_path, model, overwrite=overwrite)
    loss_function = get_loss(loss, from_logits)
    original = load_model(model, unsafe)
    wide = cast_model(original)
    x, y = calibration_data(data, dataset, wide, max_samples)
    risk = EmpiricalRisk(wide, x, y, loss_function, batch_size=batch_size)
    figures = analyze_hessian(risk, top_k=top_k, full=full, rtol=zero_rtol, trace_samples=trace_samples, seed=seed)
    figures["device"] = placed
    click.echo(summary(figures), err=json_path == "-")
    write_json(figures, json_path)


def _values(values):
    return ", ".join(f"{value:.4g}" for value in values)


def summary(figures):
    """The figures as a few lines of text."""
    eigenvalues = figures["eigenvalues"]
    counts = f"{figures['negative']} negative, {figures['zero']} zero, {figures['positive']} positive"
    if figures["counts_complete"]:
        spectrum = f"full spectrum of {figures['params']}: {counts}"
    else:
        spectrum = f"Lanczos, {len(eigenvalues)} of {figures['params']} computed (counts of those only): {counts}"
    shown = min(5, max(1, len(eigenvalues) // 2))
    trace = (f"{figures['trace']:.6g} (exact)" if figures["trace_method"] == "exact"
             else f"{figures['trace']:.6g} +- {figures['trace_error']:.2g} (Hutchinson)")
    return "\n".join([
        f"loss {figures['loss']:.6g}   gradient norm {figures['grad_norm']:.3g}   "
        f"({figures['dtype']}, {figures['params']} weights, {figures['samples']} samples)",
        f"eigenvalues, {spectrum}; zero means |lambda| <= {figures['zero_threshold']:.3g}",
        f"smallest: {_values(eigenvalues[:shown])}",
        f"largest:  {_values(eigenvalues[-shown:])}",
        f"trace: {trace}",
    ])

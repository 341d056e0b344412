"""`keras-embed prune`: remove redundant units and layers, verify, export."""

import json

import click

from keras_embed.tools.common import (FiniteFloat, calibration_data, data_options, device_option, handles_errors,
                                      output_options, place_computation, progress, start_strategy, strategy_option,
                                      table)


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@output_options
@data_options
@click.option("--validation", type=click.Path(path_type=str),
              help="Held-out data (.npy, .npz with x and optional y, an image folder or a tf.data.Dataset.save "
                   "folder) the result is checked on as well.")
@click.option("--mode", type=click.Choice(["exact", "condense", "data"]), default="exact", show_default=True,
              help="exact: outputs kept (within --atol); condense: merge units whose incoming weights have cosine >= --cos; "
                   "data: keep the channels that best reproduce what their readers see on the data and refit the readers "
                   "(needs one stopping rule).")
@click.option("--max-accuracy-drop", type=FiniteFloat(), metavar="PP", help="Data mode: largest accuracy drop, in percentage points (needs labels y).")
@click.option("--max-output-error", type=FiniteFloat(), metavar="E", help="Data mode: largest relative output error ||dY||/||Y||.")
@click.option("--keep-ratio", type=FiniteFloat(), metavar="R", help="Data mode: keep this fraction (0, 1] of every channel group (of its width in MODEL).")
@click.option("--target-params", type=int, metavar="N", help="Data mode: at most N parameters.")
@click.option("--target-flops", type=FiniteFloat(), metavar="N",
              help="Data mode: at most N FLOPs per sample; a value of at most 1 is that share of MODEL's FLOPs.")
@click.option("--target-latency", type=FiniteFloat(), metavar="MS",
              help="Data mode: at most MS milliseconds per call on the --latency-on runtime (median of timed calls).")
@click.option("--latency-on", type=click.Choice(["tflite", "keras"]), default="tflite", show_default=True,
              help="Runtime --target-latency is measured on: the TFLite interpreter (XNNPACK) or a compiled Keras forward.")
@click.option("--latency-batch", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Rows per call for --target-latency.")
@click.option("--latency-threads", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="TFLite interpreter threads for --target-latency (Keras uses TensorFlow's own thread pools).")
@click.option("--allocation", type=click.Choice(["global", "uniform"]), default="global", show_default=True,
              help="Data mode: choose widths across layers by one price on output error per parameter (per FLOP "
                   "for --target-flops/--target-latency) saved, or give every layer the same keep ratio or tolerance.")
@click.option("--hold-out", "hold_out_share", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              metavar="SHARE",
              help="Approximate modes without --validation: the share of the calibration rows (seeded) held out "
                   "to judge the rule on; 0 judges on the calibration rows themselves.")
@click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95,
              show_default=True, metavar="C",
              help="Data mode: --max-accuracy-drop and --max-output-error hold for the one-sided upper confidence "
                   "bound at level C on the held-out rows, not the point estimate (the report gives both).")
@click.option("--cos", type=FiniteFloat(-1, 1), default=0.99, show_default=True, help="Condense mode: cosine similarity that groups units.")
@click.option("--gram-budget", type=click.IntRange(min=1), default=256, show_default=True, metavar="MIB",
              help="Data mode: memory one channel group's Gram matrix and cross-product may take, in MiB.")
@strategy_option
@device_option
@click.option("--finetune", type=click.IntRange(min=1), metavar="EPOCHS", help="Train the result this many epochs on the calibration data (needs labels y); reported separately.")
@click.option("--lin-tol", type=FiniteFloat(min=0), default=1e-4, show_default=True,
              help="Affine-fit residual sqrt(1-R^2) below which a smooth unit counts as linear on the data.")
@click.option("--allow-growth", is_flag=True, help="Collapse linearized layers even when the merged layer has more weights.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=str), help="Write the JSON report to this path.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (the table goes to stderr).")
@click.option("--rtol", type=FiniteFloat(min=0), default=1e-6, show_default=True, help="Relative tolerance for zero and equal weights.")
@click.option("--force", is_flag=True, help="Write the model even if verification fails.")
@click.option("--keep-format", is_flag=True,
              help="Write the input's own format (a tf_keras .h5 or SavedModel is written by tf_keras, "
                   "a plain SavedModel with model.export); -o may then omit the extension.")
@click.option("--quantize", type=click.Choice(["float16", "int8"]),
              help="Quantize a .tflite output; int8 calibrates on --data or --dataset. The export is checked "
                   "within 1e-2 (float16) or 1e-1 (int8) times the output scale.")
@handles_errors
def prune(model, output, format_, overwrite, atol, unsafe, data, dataset, batch_size, max_samples, validation, mode, max_accuracy_drop,
          max_output_error, keep_ratio, target_params, target_flops, target_latency, latency_on, latency_batch,
          latency_threads, allocation, hold_out_share, confidence, cos, gram_budget, strategy, device, finetune, lin_tol,
          allow_growth, report, as_json, rtol, force, keep_format, quantize):
    """Remove redundant units and layers from MODEL and write the smaller model to OUTPUT.

    MODEL is a .keras or .h5 file (Keras 3 or tf_keras), or a SavedModel folder: one
    written by tf_keras is read by tf_keras in a child process, a plain one (model.export,
    TF Serving) is rebuilt from its serving graph. Without an extension, OUTPUT takes the
    input's own format.

    Exact mode, from the weights: zero-out units are dropped, constant units folded into
    the next bias, duplicate units merged, and layers with a linear activation composed
    into the next. With --data or --dataset, also from the data: units dead or constant
    on it are removed and layers that compute linearly on it are collapsed; the result
    then matches MODEL on that data (and on --validation), not necessarily elsewhere.
    Outputs are compared on the calibration data (default 1024 seeded standard-normal
    inputs) and --validation; above --atol nothing is written and the exit code is 3.

    The condense and data modes approximate: the stopping rule must hold on --validation
    (else on the --hold-out share of the calibration rows, seeded), or nothing is written
    and the exit code is 3.

    The written file is loaded back by its own runtime (Keras, tf.saved_model, the TFLite
    interpreter, tf_keras, onnxruntime) and its outputs compared on the calibration data;
    above the tolerance nothing is written and the exit code is 3.

    With --strategy, the statistics passes share each batch across the replicas of a
    tf.distribute strategy; with multi-worker, only the chief writes OUTPUT and --report.

    \b
    Exit codes: 0 ok, 2 bad usage or input, 3 verification failed, 4 unsupported model.
    """
    placed = place_computation(device, strategy)
    strategy, shared, writes = start_strategy(strategy)
    from keras_embed.measure.latency import Latency
    from keras_embed.pipeline import prune as prune_model
    from keras_embed.files.data import load_checked, row_count, spread_rows
    from keras_embed.files.export import check_export_options, export_model
    from keras_embed.files.inputs import input_kind, load_input, resolve_output, writes_tf_keras
    from keras_embed.files.save import check_io_format, check_output, check_side_output, published_together, write_text
    from keras_embed.measure.sparsity import sparsity_figures
    from keras_embed.verify import calibration_inputs
    from keras_embed.stopping import stopping_rule_from_options

    rules = dict(max_accuracy_drop=max_accuracy_drop, max_output_error=max_output_error,
                 keep_ratio=keep_ratio, target_params=target_params, target_flops=target_flops,
                 target_latency=target_latency)
    if mode != "data" and any(value is not None for value in rules.values()):
        raise click.UsageError("stopping rules (--max-accuracy-drop, ...) apply to --mode data only")
    rule = stopping_rule_from_options(**rules, confidence=confidence) if mode == "data" else None
    kind = input_kind(model)
    output, format_ = resolve_output(output, kind, format_, keep_format)
    format_ = check_output(output, model, format_, overwrite)
    check_export_options(format_, quantize, data is not None or dataset is not None)
    if report:
        check_side_output(report, model, output, overwrite=overwrite)
    original, notes = load_input(model, kind, unsafe)
    check_io_format(original, format_, writes_tf_keras(kind, keep_format), quantize)
    x, y = calibration_data(data, dataset, original, max_samples)
    held_out = held_out_y = None
    if validation is not None:
        held_out, held_out_y = (spread_rows(part, max_samples) for part in load_checked(validation, original))
    if finetune and y is None:
        raise click.UsageError("--finetune needs labels: y in the --data .npz, or --dataset")
    if finetune:
        from keras_embed.finetune import check_one_output

        check_one_output(original)
    with progress(0 if x is None else row_count(x), "statistics") as bar:
        pruned, result = prune_model(
            original, rtol, x, atol, force, mode=mode, rule=rule, labels=y, validation=held_out,
            validation_labels=held_out_y, cos=cos, lin_tol=lin_tol, allow_growth=allow_growth,
            batch_size=batch_size, on_batch=bar.update, gram_budget=gram_budget * 2**20, strategy=strategy,
            allocation=allocation, hold_out_share=hold_out_share,
            latency=Latency(latency_on, latency_batch, latency_threads),
        )
    figures = {"input": {"kind": kind, **notes}, **result.to_dict(), "device": placed,
               **({"strategy": shared} if shared else {})}
    sparsity = sparsity_figures(original, pruned)
    if sparsity["zero_kernel_weights_before"]:
        figures["sparsity"] = sparsity
    if finetune:
        pruned, figures["finetune"] = _finetune(original, pruned, x, y, finetune, held_out, held_out_y, batch_size,
                                                figures.get("held_out"))
    if not writes:
        click.echo(f"{summary(figures, output)}\n(a worker: the chief writes {output})", err=True)
        return
    check_x = calibration_inputs(pruned) if x is None else x
    with published_together():  # a report that cannot be written leaves no model behind
        figures.update(export_model(pruned, output, check_x, format_, quantize, x, atol, force,
                                    writes_tf_keras(kind, keep_format)))
        text = json.dumps(figures, indent=2)
        if report:
            write_text(report, text + "\n")
    click.echo(summary(figures, output), err=as_json)
    for note in figures.get("warnings", ()):
        click.echo(f"warning: {note}", err=True)
    if as_json:
        click.echo(text)


def _finetune(original, pruned, x, y, epochs, held_out, held_out_y, batch_size, split):
    """Fine-tunes `pruned` on (x, y) (without the rows `split` held out, the report's
    `held_out`, when given); returns it and its figures on the held-out data."""
    from keras_embed.finetune import finetune
    from keras_embed.pipeline import hold_out
    from keras_embed.stopping import measure
    from keras_embed.verify import predict

    if split is not None:
        (x, y), (held_out, held_out_y), _ = hold_out(x, y, split["share"], split["seed"])
    tuned = finetune(pruned, x, y, epochs)
    check_x, check_y = (x, y) if held_out is None else (held_out, held_out_y)
    figures = measure(predict(original, check_x, batch_size), predict(tuned, check_x, batch_size), check_y)
    return tuned, {"epochs": epochs, **figures}


def _percent(value):
    return "-" if value is None else f"{100 * value:.2f}%"


def summary(figures, output):
    """Before/after table and the figures that prove the result, written to `output`."""
    removed = ", ".join(f"{count} {kind.replace('_', '-')}" for kind, count in figures["removed"].items())
    lines = [
        table(figures["layers"], ("name", "width_before", "width_after", "linear_fraction")),
        f"mode: {figures['mode']}   params: {figures['params_before']} -> {figures['params_after']}   "
        f"flops: {figures['flops_before']} -> {figures['flops_after']}   "
        f"depth: {figures['depth_before']} -> {figures['depth_after']}   removed units: {removed}",
    ]
    if figures["collapsed_layers"]:
        lines.append(f"collapsed linearized layers: {', '.join(figures['collapsed_layers'])}")
    if figures["not_collapsed_would_grow"]:
        lines.append(f"linearized but kept (merging would grow; --allow-growth): {', '.join(figures['not_collapsed_would_grow'])}")
    if "max_abs_diff" in figures:
        lines.append(f"max abs output difference: {figures['max_abs_diff']:.3g} (atol {figures['atol']:.3g}, on {figures['calibration']})")
        if figures["max_abs_diff_validation"] is not None:
            lines.append(f"max abs output difference on validation data: {figures['max_abs_diff_validation']:.3g}")
    if "output_error" in figures:
        agreement = f"agreement {_percent(figures['agreement'])}, " if "agreement" in figures else ""
        accuracy = (f", accuracy {_percent(figures['accuracy_before'])} -> {_percent(figures['accuracy_after'])}"
                    if "accuracy_before" in figures else "")
        split = figures.get("held_out")
        where = (f"{figures['checked_on']} ({split['rows']:,} of {split['rows'] + split['calibration_rows']:,}, "
                 f"seed {split['seed']})" if split else figures["checked_on"])
        lines.append(f"on {where}: {agreement}relative output error {figures['output_error']:.3g}{accuracy}")
        if "confidence" in figures:
            drop = (f"accuracy drop {figures['accuracy_drop']:.3g} pp, bound {figures['accuracy_drop_bound']:.3g} pp; "
                    if "accuracy_drop_bound" in figures else "")
            lines.append(f"upper {figures['confidence']:.0%} confidence bounds on {figures['rows']:,} rows: {drop}"
                         f"output error bound {figures['output_error_bound']:.3g}")
    if "latency_ms" in figures:
        rule = figures["rule"]
        setting = figures["latency_on"]
        lines.append(f"latency on {setting['runtime']} (batch {setting['batch_size']}, {setting['threads']} "
                     f"thread{'s' * (setting['threads'] > 1)}): {figures['latency_ms_before']:.3g} -> "
                     f"{figures['latency_ms']:.3g} ms per call (target {rule['value']:g} ms)")
    if figures.get("rule", {}).get("kind") == "target_flops":
        lines.append(f"flops: {figures['flops_after']:,} per sample (target {int(figures['rule']['value']):,})")
    if "finetune" in figures:
        tuned = figures["finetune"]
        lines.append(f"after {tuned['epochs']} epochs of fine-tuning: agreement {_percent(tuned['agreement'])}, "
                     f"accuracy {_percent(tuned.get('accuracy_after'))}")
    if "sparsity" in figures:
        sparse = figures["sparsity"]
        lines.append(f"zero kernel weights: {sparse['zero_kernel_weights_before']} -> {sparse['zero_kernel_weights_after']} "
                     f"({_percent(sparse['zeros_realized'])} became smaller dense layers, {sparse['params_removed']} params removed)")
    quantized = f", {figures['export_quantize']}" if figures["export_quantize"] else ""
    lines.append(f"input: {figures['input']['kind']} (read with {figures['input']['read_with']})   "
                 f"output: {output} ({figures['export_format']}{quantized}), loaded back: "
                 f"max abs difference {figures['export_max_abs_diff']:.3g} (atol {figures['export_atol']:.3g})")
    lines.append(f"seconds: {figures['seconds']}")
    return "\n".join(lines)

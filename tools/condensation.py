"""`keras-embed experiment condensation`: the width paper's plateaus, with and without escape.

Example:
    keras-embed experiment condensation -o build/condensation --seeds 5
    keras-embed experiment condensation -o build/digits --task digits --seeds 3
"""

import logging

import click

from keras_embed.tools.common import device_option, handles_errors, place_computation

TASK_NAMES = ("1d", "digits")  # keras_embed.experiments.condensation.TASKS, named here so --help needs no TensorFlow


@click.command("condensation")
@click.option("-o", "--output-dir", default="condensation", show_default=True,
              type=click.Path(file_okay=False, path_type=str), help="Folder for results.json, curves.csv, "
              "summary.md and loss.png.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier result folder.")
@click.option("--task", "tasks", type=click.Choice(TASK_NAMES), multiple=True,
              help="A fit to run (repeatable; default: both).")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True, help="Seeds 0..N-1 per network.")
@click.option("--epochs", type=click.IntRange(min=10), default=None,
              help="Full-batch epochs per run  [default: 400 for 1d, 600 for digits].")
@device_option
@handles_errors
def condensation(output_dir, overwrite, tasks, seeds, epochs, device):
    """Fit small-initialised two-layer networks with EmbeddingMonitor watching.

    1d: a 1-500-1 tanh (and relu) network, full-batch Adam on 50 points of a 1-D task; the
    tanh network sits on the best linear fit (a saddle embedded from width 1) before it
    leaves it. digits: a 64-200-10 relu network, MSE on one-hot targets of 1000 digits; it
    sits at the class frequencies (the width-0 saddle) before its units grow. Each seed runs
    with action="warn" and action="escape"; the table gives the median epoch the plateau is
    left, the first epoch below the task's loss level and the final loss.

    \b
    Exit codes: 0 ok, 2 bad usage or output folder.
    """
    from keras_embed.experiments.condensation import condensation as run, summary_table, write
    from keras_embed.experiments.report import check_folder

    check_folder(output_dir, overwrite)
    placed = place_computation(device)
    logging.getLogger("keras_embed.callbacks").setLevel(logging.ERROR)  # the table says what the monitor saw
    result = run(seeds=tuple(range(seeds)), tasks=tasks or TASK_NAMES, epochs=epochs)
    result["device"] = placed
    click.echo(summary_table(result))
    files = write(result, output_dir, overwrite)
    click.echo(f"{result['seconds']} s; wrote {', '.join(files)} to {output_dir}")

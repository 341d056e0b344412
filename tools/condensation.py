"""`keras-embed experiment condensation`: the width paper's plateau, with and without escape.

Example:
    keras-embed experiment condensation -o build/condensation --seeds 5
"""

import logging

import click

from keras_embed.tools.common import handles_errors


@click.command("condensation")
@click.option("-o", "--output-dir", default="condensation", show_default=True,
              type=click.Path(file_okay=False, path_type=str), help="Folder for results.json, curves.csv, "
              "summary.md and loss.png.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier result folder.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True, help="Seeds 0..N-1 per network.")
@click.option("--epochs", type=click.IntRange(min=10), default=400, show_default=True, help="Full-batch epochs per run.")
@handles_errors
def condensation(output_dir, overwrite, seeds, epochs):
    """Fit a 1-500-1 tanh (and relu) network from a small start with EmbeddingMonitor watching.

    Full-batch Adam on 50 points of a 1-D task; the tanh network sits on the best linear
    fit (a saddle embedded from width 1) before it leaves it. Each seed runs with
    action="warn" and action="escape"; the table gives the median epoch the plateau is
    left, the first epoch below a loss of 0.002 and the final loss.

    \b
    Exit codes: 0 ok, 2 bad usage or output folder.
    """
    from keras_embed.experiments.condensation import condensation as run, summary_table, write
    from keras_embed.experiments.report import check_folder

    check_folder(output_dir, overwrite)
    logging.getLogger("keras_embed.callbacks").setLevel(logging.ERROR)  # the table says what the monitor saw
    result = run(seeds=tuple(range(seeds)), epochs=epochs)
    click.echo(summary_table(result))
    files = write(result, output_dir, overwrite)
    click.echo(f"{result['seconds']} s; wrote {', '.join(files)} to {output_dir}")

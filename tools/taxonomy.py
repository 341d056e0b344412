"""`keras-embed experiment taxonomy`: the taxonomy paper's phase diagram (width x batch size) on the digits.

Example:
    keras-embed experiment taxonomy --quick -o build/taxonomy
    keras-embed experiment taxonomy -o build/taxonomy --widths 4,8,16,32,64 --batch-sizes 16,64,256 --seeds 3
"""

import click

from keras_embed.tools.common import device_option, handles_errors, place_computation


def _sizes(context, parameter, value):
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"give positive integers separated by commas, e.g. 4,16,64. Received: {value!r}")
    return sizes


@click.command("taxonomy")
@click.option("-o", "--output-dir", default="taxonomy", show_default=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder for results.json, cells.csv, summary.md and phases.png.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier result folder.")
@click.option("--quick", is_flag=True, help="A 3 x 2 grid, 2 seeds, 8 epochs: about a minute on a CPU.")
@click.option("--widths", callback=_sizes, metavar="W,W,...", help="Hidden widths (the load-like axis) [default: 4,8,16,32,64].")
@click.option("--batch-sizes", callback=_sizes, metavar="B,B,...",
              help="Batch sizes (the temperature-like axis) [default: 16,64,256].")
@click.option("--seeds", type=click.IntRange(min=2), help="Seeds per cell (pairs of them give mc and CKA) [default: 3].")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs of every model [default: 30].")
@device_option
@handles_errors
def taxonomy(output_dir, overwrite, quick, widths, batch_sizes, seeds, epochs, device):
    """Train a grid of digits MLPs and measure the taxonomy paper's four metrics per cell.

    Each cell (a hidden width, a batch size) trains a 64-w-w-10 relu MLP with SGD
    (momentum 0.9, learning rate 0.05) for every seed; per cell: test accuracy, training
    loss, Hessian top eigenvalue and trace (mean over seeds), mode connectivity mc of the
    trained Bézier curve and output CKA (mean over pairs of seeds). docs/taxonomy.md reads
    a default run against the paper.

    \b
    Exit codes: 0 ok, 2 bad usage or output folder.
    """
    import dataclasses

    from keras_embed.experiments.report import check_folder
    from keras_embed.experiments.taxonomy import TaxonomySettings, summary_table, taxonomy as run, write

    check_folder(output_dir, overwrite)
    placed = place_computation(device)
    given = {key: value for key, value in dict(widths=widths, batch_sizes=batch_sizes, seeds=seeds, epochs=epochs).items()
             if value is not None}
    settings = dataclasses.replace(TaxonomySettings.quick() if quick else TaxonomySettings(), **given)
    result = run(settings, on_cell=lambda row: click.echo(f"width {row['width']}, batch {row['batch_size']}: "
                                                         f"test accuracy {row['test_accuracy']:.2%}, mc {row['mc']:.2f}",
                                                         err=True))
    result["device"] = placed
    click.echo(summary_table(result))
    files = write(result, output_dir, overwrite)
    click.echo(f"{result['seconds']} s; wrote {', '.join(files)} to {output_dir}")

"""`keras-embed bn-ablation` and `keras-embed data-size`: the depth paper's two claims, measured.

Example:
    keras-embed bn-ablation --quick -o build/bn
    keras-embed data-size --dataset digits --fractions 0.1,0.5,1 -o build/size
"""

import functools

import click

from keras_embed.tools.common import DATASETS, FiniteFloat, _options, device_option, handles_errors, progress

_experiment_options = _options(
    click.option("--dataset", type=click.Choice(DATASETS), help="Bundled training data [default: digits]."),
    click.option("--data", type=click.Path(dir_okay=False, path_type=str),
                 help="Training data instead: .npz with x and y (integer y: classification, float y: regression)."),
    click.option("--quick", is_flag=True, help="Small preset (depth 4, width 32, 200 steps, 2 seeds): seconds on a CPU."),
    click.option("--depth", type=int, help="Hidden Dense layers [default: 8]."),
    click.option("--width", type=int, help="Units per hidden layer [default: 64]."),
    click.option("--activation", help="Hidden activation, any Keras name [default: relu]."),
    click.option("--optimizer", help="Keras optimizer name [default: sgd]."),
    click.option("--learning-rate", type=FiniteFloat(), help="[default: 0.05]"),
    click.option("--batch-size", type=int, help="[default: 128 on CPU, 512 on GPU]"),
    click.option("--steps", type=int, help="Training steps per run [default: 2000]."),
    click.option("--record-every", type=int, help="Record the mean minibatch loss every K steps [default: 10]."),
    click.option("--checkpoints", type=int, help="Linearity measurements per run after the start [default: 10]."),
    click.option("--seeds", type=int, help="Seeds 0..N-1 [default: 5]."),
    click.option("--probe-size", type=int, help="Training samples the linearity is measured on [default: 512]."),
    device_option,
    click.option("--mixed-precision", is_flag=True, help="float16 compute with loss scaling (GPU only)."),
    click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=str),
                 help="Folder for results.json, curves.csv, summary.md, loss.png, linear_fraction.png."),
    click.option("--overwrite", is_flag=True, help="Replace an earlier result folder."),
)

_SETTING_NAMES = ("depth", "width", "activation", "optimizer", "learning_rate", "batch_size", "steps",
                  "record_every", "checkpoints", "probe_size")


def _settings_and_task(options):
    from keras_embed.experiments.training import Settings, load_task

    if options["data"] is not None and options["dataset"] is not None:
        raise click.UsageError("give --data or --dataset, not both")
    changes = {name: options[name] for name in _SETTING_NAMES if options[name] is not None}
    if options["mixed_precision"]:
        changes["mixed_precision"] = True
    if options["seeds"] is not None:
        if options["seeds"] < 1:
            raise click.BadParameter("must be at least 1", param_hint="--seeds")
        changes["seeds"] = tuple(range(options["seeds"]))
    settings = Settings.quick(**changes) if options["quick"] else Settings(**changes)
    return settings, load_task(options["data"] or options["dataset"] or "digits")


def _run_and_write(options, run, variant_count, label):
    """Runs `run(task, settings, device=..., on_step=...)` with a progress bar, writes the
    result folder and prints the summary."""
    from keras_embed.experiments import report

    settings, task = _settings_and_task(options)
    report.check_folder(options["output_dir"], options["overwrite"])  # before the training, not after it
    with progress(settings.steps * len(settings.seeds) * variant_count, label) as bar:
        comparison = run(task, settings, device=options["device"], on_step=bar.update)
    files = report.write(comparison, options["output_dir"], overwrite=options["overwrite"])
    click.echo(f"{comparison.experiment} on {comparison.task}, device {comparison.device['used']}, "
               f"seeds {len(settings.seeds)}, {settings.steps} steps each")
    click.echo(report.summary_table(comparison, report.summarize(comparison)))
    click.echo(f"wrote {', '.join(files)} to {options['output_dir']}")


@click.command("bn-ablation")
@_experiment_options
@handles_errors
def bn_ablation(**options):
    """Train a deep MLP with and without BatchNormalization: loss decay and layer linearization.

    Same data and initial Dense weights for both, several seeds; writes json, csv, markdown
    and PNG plots into --output-dir and prints the summary table.
    """
    from keras_embed.experiments.bn_ablation import bn_ablation as run

    _run_and_write(options, run, 2, "bn-ablation")


def _fractions(context, parameter, value):
    try:
        fractions = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers, e.g. 0.1,0.5,1") from None
    if any(not 0 < fraction <= 1 for fraction in fractions):
        raise click.BadParameter(f"every fraction must be in (0, 1]; got {value}")
    return fractions


@click.command("data-size")
@_experiment_options
@click.option("--fractions", default="0.1,0.25,0.5,1", show_default=True, callback=_fractions,
              help="Nested random subsets of the training data, as fractions of it.")
@click.option("--batch-norm", is_flag=True, help="Train the MLP with BatchNormalization after each hidden Dense.")
@handles_errors
def data_size(fractions, batch_norm, **options):
    """Train the same MLP on growing subsets of the data: loss decay and linearization vs n."""
    from keras_embed.experiments.bn_ablation import data_size as run

    _run_and_write(options, functools.partial(run, fractions=fractions, batch_norm=batch_norm), len(set(fractions)), "data-size")

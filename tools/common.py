"""What every command shares: quiet TensorFlow start-up, error-to-exit-code mapping, tables.

Exit codes: 0 ok, 2 bad usage or unreadable input, 3 verification failed,
4 unsupported model, 130 interrupted (Ctrl-C; 143 for SIGTERM), 1 internal error.
"""

import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time

import click

from keras_embed.devices import DEVICES

UNSAFE_HELP = (
    "Load the model with Keras safe mode off. Safe mode refuses to run code stored in a model "
    "file (Lambda layers, pickled functions); turn it off only for files you trust."
)


def quiet_tensorflow():
    """Imports Keras with TensorFlow's C++ start-up logs silenced (they bypass Python)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" in sys.modules:
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import keras  # noqa: F401
            import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")  # retracing notices from the per-layer statistics passes


def fail(message, code):
    """Prints a one-line error on stderr and exits with `code`."""
    click.echo(f"keras-embed: error: {message}", err=True)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that every `finally` (temporaries, Keras'
    extraction folders) runs before it exits."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises `Terminated` in the block (main thread only: elsewhere it cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handles_errors(command):
    """Turns keras-embed errors into one-line messages and documented exit codes; Ctrl-C
    and SIGTERM stop the command after its clean-up (exit 130 and 143)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from keras_embed.errors import KerasEmbedError  # no TensorFlow import

        try:
            with _sigterm_raises():
                quiet_tensorflow()
                return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit):
            raise  # click prints usage errors itself (exit code 2)
        except KerasEmbedError as error:
            fail(str(error), error.exit_code)
        except ValueError as error:  # argument validation in the library
            fail(str(error), 2)
        except KeyboardInterrupt:
            fail("interrupted (Ctrl-C); unfinished outputs were removed", 130)
        except Terminated:
            fail("terminated (SIGTERM); unfinished outputs were removed", 128 + signal.SIGTERM)
        except Exception as error:
            if os.environ.get("KERAS_EMBED_DEBUG"):
                raise
            fail(f"internal error: {type(error).__name__}: {error}; rerun with KERAS_EMBED_DEBUG=1 and report it", 1)

    return wrapper


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and infinities, within optional bounds (click's
    FloatRange lets NaN through: every comparison with it is false).

    Example:
        >>> click.option("--rtol", type=FiniteFloat(min=0), default=1e-6)
    """

    name = "float"  # click's messages: "'abc' is not a valid float."

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number

    def _describe_range(self):
        return "finite" if self.min is None and self.max is None else super()._describe_range()


def table(rows, columns):
    """Formats dict rows as an aligned text table with the given columns (with
    heads_before and heads_after after them when a row is an attention layer)."""
    if any(row.get("heads_before") is not None for row in rows):
        columns = (*columns, "heads_before", "heads_after")
    cells = [[str(column) for column in columns]] + [
        ["-" if row[column] is None else str(row[column]) for column in columns] for row in rows
    ]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) if index else cell.ljust(width) for index, (cell, width) in enumerate(zip(line, widths))) for line in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def _options(*options):
    """A decorator applying click options in the order listed."""

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


DATASETS = ["digits", "iris", "wine", "breast_cancer", "regression1d"]  # keras_embed.files.data.DATASETS, without importing keras

unsafe_option = click.option("--unsafe", is_flag=True, help=UNSAFE_HELP)

strategy_option = click.option(
    "--strategy", type=click.Choice(["default", "mirrored", "multi-worker"]), default="default", show_default=True,
    help="Share every batch of the statistics passes across devices with tf.distribute: mirrored over this "
         "machine's GPUs, multi-worker over the machines TF_CONFIG names (run the same command on each; the chief "
         "writes the files). The result is the one-device result, up to rounding.")


device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
    help="Where to compute: auto takes a GPU when TensorFlow sees one, else the CPU; recorded in the report.")


def place_computation(device, strategy="default"):
    """Places the rest of the command on --device (`devices.resolve_device`) and returns the
    report's `device` entry; with a --strategy the strategy places it.

    Raises:
        click.UsageError: --device cpu or gpu beside a --strategy.
    """
    if strategy != "default":
        if device != "auto":
            raise click.UsageError("--device picks one device and --strategy its own; give one of them")
        return {"requested": device, "used": f"--strategy {strategy}"}
    import tensorflow as tf

    from keras_embed.devices import resolve_device

    name, record = resolve_device(device)
    click.get_current_context().with_resource(tf.device(name))
    return record


def start_strategy(name):
    """(the `tf.distribute.Strategy` of --strategy NAME or None, the report's `strategy`
    entry or None, whether this process writes the files); made first, as
    `MultiWorkerMirroredStrategy` must be."""
    if name == "default":
        return None, None, True
    from keras_embed.measure.replicas import is_chief, named_strategy

    strategy = named_strategy(name)
    return strategy, {"kind": name, "replicas": strategy.num_replicas_in_sync}, is_chief(strategy)


def _force_progress(context, parameter, value):
    context.meta["keras_embed.progress"] = value


progress_option = click.option("--progress", "progress_", is_flag=True, expose_value=False, callback=_force_progress,
                               help="Show the progress bar (rows/s, time left) on stderr even when it is not a terminal.")


def json_output_option(what):
    """--json PATH: `what` as JSON to PATH ('-': stdout, the summary then goes to stderr)."""
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str),
                        help=f"Write {what} as JSON to this path ('-': stdout, the summary then goes to stderr).")


def write_json(figures, json_path):
    """`figures` as indented JSON to --json's path, or stdout for '-' (nothing without a path)."""
    import json

    from keras_embed.files.save import write_text

    text = json.dumps(figures, indent=2)
    if json_path == "-":
        click.echo(text)
    elif json_path is not None:
        write_text(json_path, text + "\n")


data_options = _options(
    click.option("--data", type=click.Path(path_type=str),
                 help="Calibration inputs: .npy, .npz with key x (else its first array) and optional labels y, or an "
                      "image folder (one sub-folder per class, labels from the folder names, resized to the model's "
                      "input), or a folder written by tf.data.Dataset.save (elements x or (x, y))."),
    click.option("--dataset", type=click.Choice(DATASETS),
                 help="Use a dataset bundled with scikit-learn (or the synthetic 1-D regression task) as calibration data (no download)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                 help="Samples per batch of the statistics and verification passes."),
    click.option("--max-samples", type=click.IntRange(min=1), metavar="N",
                 help="Use at most N rows of --data, --dataset and --validation, spread over them (every k-th row), "
                      "to bound the passes."),
    progress_option,
)

output_options = _options(
    click.option("-o", "--output", required=True, type=click.Path(path_type=str),
                 help="Where to write the model: .keras, .h5, .tflite, .onnx (needs the onnx extra), or a folder "
                      "ending in / for a SavedModel; prune: without an extension, in the input's format."),
    click.option("--format", "format_", type=click.Choice(["keras", "h5", "savedmodel", "tflite", "onnx"]),
                 help="Output format, when the extension does not say."),
    click.option("--overwrite", is_flag=True,
                 help="Replace the output (and report) if it exists; without it an existing one is an error (exit 2)."),
    click.option("--atol", type=FiniteFloat(min=0),
                 help="Largest allowed max abs output difference, for embed and exact prune "
                      "[default: 1e-4 times the output scale, or 10 times the outputs' change when every input moves "
                      "by one float32 rounding step, whichever is larger]."),
    unsafe_option,
)


def calibration_data(data, dataset, model, max_samples=None):
    """Checked calibration (inputs, labels or None) from --data or --dataset, at most
    `max_samples` rows of it (`data.spread_rows`), or (None, None)."""
    if data is not None and dataset is not None:
        raise click.UsageError("give --data or --dataset, not both")
    if data is None and dataset is None:
        return None, None
    from keras_embed.files.data import bundled_dataset, check_inputs, check_labels, load_checked, spread_rows

    if data is not None:
        x, y = load_checked(data, model)
    else:
        x, y = bundled_dataset(dataset)
        x = check_inputs(x, model)
        y = check_labels(y, x)
    return spread_rows(x, max_samples), spread_rows(y, max_samples)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, count):
        pass




def progress(samples, label):
    """A stderr progress bar over `samples` with rows/s and time left (none when stderr is
    not a terminal, unless --progress).

    Use as a context manager and call `.update(n)`.

    Example:
        >>> with progress(100_000, "statistics") as bar:
        ...     bar.update(256)       # statistics  [#-----]    2%  12,345 rows/s  00:00:08
    """
    context = click.get_current_context(silent=True)
    forced = context is not None and context.meta.get("keras_embed.progress")
    if not (sys.stderr.isatty() or forced):
        return _NoProgress()
    bar = click.progressbar(length=samples, label=label, file=sys.stderr, item_show_func=lambda text: text,
                            show_eta=True)
    bar._is_atty = True  # click 8 draws only on a terminal (no public switch); --progress asks for a pipe too
    return _RateBar(bar)


class _RateBar:
    """A `click.progressbar` whose `update(rows)` also shows the rows per second so far."""

    def __init__(self, bar):
        self.bar, self.rows, self.start = bar, 0, time.monotonic()

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.bar.__exit__(*exc_info)

    def update(self, rows):
        self.rows += rows
        self.bar.update(rows, f"{self.rows / max(time.monotonic() - self.start, 1e-9):,.0f} rows/s")

"""Model files out: atomic writing in every export format, and the checks of output paths.

Writing goes to a temporary path beside the target (`.ke-PID-RANDOM.tmp...`), is flushed
to disk and renamed into place, so a failed or killed write never leaves a partial model at
the target: the target is the old file or the new one, and a killed writer leaves at most
its hidden temporary behind. Outputs are regular files or SavedModel folders: a device,
FIFO or socket at an output path (or a symlink to one) is refused, before the work and
again before the rename. What the system refuses while writing (a full disk, a read-only
folder) is an `InputError` naming the reason.

Example:
    >>> save_model(model, "out/model.tflite")          # format from the extension
    'out/model.tflite'
"""

import contextlib
import contextvars
import dataclasses
import errno
import io
import os
import secrets
import shutil
import stat
from pathlib import Path

import numpy as np

from keras_embed.errors import InputError, KerasEmbedError

FORMATS = ("keras", "h5", "savedmodel", "tflite", "onnx")
_SUFFIX_FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".tflite": "tflite", ".onnx": "onnx"}


def output_format(path, format=None):
    """The export format for `path`: `format` if given, else from its ending.

    A path ending in '/' is a SavedModel folder; '.keras', '.h5', '.tflite' and '.onnx' name theirs.
    """
    if format is not None:
        if format not in FORMATS:
            raise InputError(f"unknown format '{format}'; choose one of {', '.join(FORMATS)}")
        implied = _SUFFIX_FORMATS.get(Path(path).suffix.lower())
        if implied not in (None, format):
            raise InputError(f"output '{path}' ends in {Path(path).suffix} but the format is {format}; make them agree")
        return format
    if str(path).endswith(("/", os.sep)):
        return "savedmodel"
    found = _SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise InputError(
            f"cannot tell the format of output '{path}'; end it with .keras, .h5, .tflite, .onnx or / (SavedModel), "
            "or pass --format"
        )
    return found


def _target(path):
    """The absolute, normalized path that will be written ('out/' becomes 'out')."""
    return Path(os.path.abspath(path))


_SPECIAL_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def special_kind(path):
    """What is at `path` (through symlinks) when it is neither a regular file nor a folder,
    else None (also when nothing is there).

    Example:
        >>> special_kind("/dev/null")
        'a character device'
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there, a dangling symlink or a symlink loop: nothing is written through it
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((kind for is_kind, kind in _SPECIAL_KINDS if is_kind(mode)), "a special file")


def _refuse_special(target, path):
    kind = special_kind(target)
    if kind is not None:
        what = f"a symlink to {kind}" if os.path.islink(target) else kind
        raise InputError(f"output '{path}' is {what}; outputs are regular files or SavedModel folders, "
                         "so it is never replaced: choose another path")


def _system_limit(folder, name):
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):  # not known for this file system (or system)
        return None


_TEMPORARY_ROOM = 128  # bytes of a path below the folder that a write may need: the hidden temporary
# (about 31 bytes) and what TensorFlow writes inside a SavedModel's


def _check_name_length(target, path):
    """Refuses a name or path longer than the output folder's file system allows."""
    name_max, path_max = (_system_limit(target.parent, name) for name in ("PC_NAME_MAX", "PC_PATH_MAX"))
    name = len(os.fsencode(target.name))
    if name_max is not None and name > name_max:
        raise InputError(f"output '{path}' has a {name}-byte name; its folder's file system allows {name_max}: "
                         "choose a shorter name")
    longest = len(os.fsencode(str(target.parent))) + 1 + max(name, _TEMPORARY_ROOM)
    if path_max is not None and longest >= path_max:
        raise InputError(f"output '{path}' needs paths of {longest} bytes; the system allows {path_max - 1}: "
                         "choose a shorter path")


def _is_full(folder):
    """Whether the file system of `folder` has no block or no inode left (False when unknown)."""
    try:
        usage = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    root = hasattr(os, "geteuid") and os.geteuid() == 0  # root may use the reserved blocks
    blocks, inodes = (usage.f_bfree, usage.f_ffree) if root else (usage.f_bavail, usage.f_favail)
    return (usage.f_blocks > 0 and blocks == 0) or (usage.f_files > 0 and inodes == 0)


def _check_target(path, taken):
    """Common checks of anything keras-embed will write at `path`; returns the absolute
    path the rename will replace (not resolved: a symlink there is replaced, not followed)."""
    target = _target(path)
    resolved = target.resolve()
    if any(resolved == _target(other).resolve() for other in taken if other is not None):
        raise InputError(f"output '{path}' is also the model input or another output; choose another path")
    if not target.parent.is_dir():
        raise InputError(f"output folder '{target.parent}' does not exist; create it first")
    if not os.access(target.parent, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise InputError(f"output folder '{target.parent}' is not writable; choose another path")
    _refuse_special(target, path)
    _check_name_length(target, path)
    if _is_full(target.parent):
        raise InputError(f"output folder '{target.parent}' is on a full file system; free some space or choose "
                         "another folder")
    return target


def _check_new(target, path, overwrite):
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise InputError(f"output '{path}' already exists; pass --overwrite to replace it, or choose a new path")


def check_side_output(path, *taken, overwrite=False):
    """Validates the path of a report or other side file before any work is done.

    Args:
        path: the side file.
        taken: paths it must not overwrite (the input model, the output model).
        overwrite: allow replacing an existing file.

    Raises:
        InputError: a folder, a device, FIFO or socket (whatever `overwrite` says), an
            existing file without `overwrite`, a path equal to one of `taken`, a missing,
            read-only or full folder, a name too long for its file system.
    """
    target = _check_target(path, taken)
    if target.is_dir():
        raise InputError(f"'{path}' is a folder; give a file path")
    _check_new(target, path, overwrite)


def check_output(path, input_path=None, format=None, overwrite=False):
    """Validates a model output path before any work is done; returns its format.

    An existing output is refused unless `overwrite`; even then only a regular file, or a
    SavedModel folder when writing one, is replaced, so no unrelated file, device or
    folder is ever deleted.

    Raises:
        InputError: unknown format, output equal to (or holding) the input, an existing
            output without `overwrite`, a folder that is not a SavedModel, a device, FIFO
            or socket, a missing, read-only or full folder, a name too long for its file
            system.
    """
    format = output_format(path, format)
    target = _check_target(path, (input_path,))
    _check_replaceable(target, path, format)
    if input_path is not None and target.resolve() in _target(input_path).resolve().parents:
        raise InputError(f"output '{path}' is a folder holding the input model; choose a new path")
    _check_new(target, path, overwrite)
    return format


def _check_replaceable(target, path, format):
    """Only a regular file, or a SavedModel folder when writing one, may be replaced
    (`_check_target` and the rename refuse devices, FIFOs and sockets)."""
    if target.is_dir() and (format != "savedmodel" or not (target / "saved_model.pb").is_file()):
        raise InputError(f"output '{path}' is an existing folder that is not a SavedModel; choose a new path")


def _write_keras(model, path):
    model.save(path)  # the suffix picks .keras or legacy .h5


def _write_savedmodel(model, path):
    model.export(str(path), format="tf_saved_model", verbose=False)


REPRESENTATIVE_ROWS = 256  # rows int8 quantization calibrates on
ONNX_EXTRA = "pip install 'keras-embed[onnx]'"
ONNX_OPSET = 17


def _input_signature(model):
    import tensorflow as tf

    tensor = model.inputs[0]
    return (tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name="input"),)


_UNROLLED = ("LSTM", "GRU", "SimpleRNN")


def _unroll_config(config):
    """A parsed model config with every LSTM, GRU and SimpleRNN in it (nested, wrapped) unrolled."""
    if isinstance(config, list):
        return [_unroll_config(item) for item in config]
    if not isinstance(config, dict):
        return config
    config = {key: _unroll_config(value) for key, value in config.items()}
    if config.get("class_name") in _UNROLLED and isinstance(config.get("config"), dict):
        config["config"] = {**config["config"], "unroll": True}
    return config


def unrolled(model):
    """`model` with its recurrent layers unrolled, same weights: TFLite converts an unrolled
    LSTM, GRU or SimpleRNN to builtin ops, a looping one only to TensorFlow's TensorList ops,
    which the TFLite runtime runs only with the Flex delegate.

    Example:
        >>> unrolled(lstm_classifier).get_layer("lstm").unroll
        True
    """
    copy = type(model).from_config(_unroll_config(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def tflite_flatbuffer(model, quantize=None, representative=None):
    """`model` (its recurrent layers `unrolled`) converted to TFLite, as bytes; `quantize` is
    None, 'float16' or 'int8' (then with `representative` inputs; inputs and outputs stay float)."""
    import tensorflow as tf

    from keras_embed.model.registry import runs_over_steps
    from keras_embed.verify import layers_within

    if any(map(runs_over_steps, layers_within(model))):
        model = unrolled(model)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        rows = np.asarray(representative[:REPRESENTATIVE_ROWS], dtype=np.float32)
        converter.representative_dataset = lambda: ([row[None]] for row in rows)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the SavedModel it converts through
        return converter.convert()


def write_tflite(model, path, quantize=None, representative=None):
    """Writes `tflite_flatbuffer(model, quantize, representative)` to `path`."""
    Path(path).write_bytes(tflite_flatbuffer(model, quantize, representative))


def write_onnx(model, path):
    """Converts `model` to ONNX with tf2onnx (the optional onnx extra)."""
    try:
        import tf2onnx
    except ImportError:
        raise InputError(f"ONNX export needs tf2onnx, which is not installed: {ONNX_EXTRA}") from None
    import tensorflow as tf

    function = tf.function(lambda x: model(x, training=False))
    tf2onnx.convert.from_function(function, input_signature=_input_signature(model), opset=ONNX_OPSET,
                                  output_path=str(path))


_WRITERS = {"keras": _write_keras, "h5": _write_keras, "savedmodel": _write_savedmodel,
            "tflite": lambda model, path: write_tflite(model, path), "onnx": write_onnx}
_TEMP_SUFFIXES = {"keras": ".keras", "h5": ".h5", "savedmodel": "", "tflite": ".tflite", "onnx": ".onnx"}
_WRITE_FIXES = {  # what the system refuses while writing, and what the user can do about it
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space or choose another folder",
    errno.EFBIG: "choose a folder on another file system",
    errno.EACCES: "choose a writable folder",
    errno.EPERM: "choose a writable folder",
    errno.EROFS: "choose a writable folder",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "check the disk or choose another folder",
    errno.ENOENT: "its folder changed meanwhile: check it and rerun",
    errno.ENOTDIR: "its folder changed meanwhile: check it and rerun",
}


@dataclasses.dataclass(frozen=True)
class _Output:
    """One output being written: its hidden temporary, the target it replaces, the path as given."""

    temporary: Path
    target: Path
    path: object


_STAGED = contextvars.ContextVar("keras_embed_staged_outputs", default=None)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _hidden(target, ending):
    """A hidden path beside `target`, unique to this process and call: `.ke-PID-RANDOM` + `ending`
    (short, so any name the file system allows for the target still fits)."""
    return target.with_name(f".ke-{os.getpid()}-{secrets.token_hex(4)}{ending}")


def _temporary(target, suffix=""):
    """The hidden temporary path beside `target` that this process writes first."""
    return _hidden(target, f".tmp{suffix}")


def _sync(path):
    """Flushes a file, or a folder's entries (on POSIX), to disk."""
    if path.is_dir() and os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace_folder(temporary, target, attempts=10):
    """Swaps the folder `temporary` in at `target`, removing what was there.

    Between the two renames the target is briefly absent; when another writer puts its
    folder there meanwhile, that one is swapped out in turn: the last writer wins.
    """
    old = _hidden(target, ".old")
    for _ in range(attempts):
        try:
            if target.is_dir() and not target.is_symlink():
                os.replace(target, old)
            os.replace(temporary, target)
            return
        except (FileNotFoundError, FileExistsError) as error:  # another writer moved the target
            last = error
        except OSError as error:
            if error.errno != errno.ENOTEMPTY:
                raise
            last = error
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise last


def _publish(temporary, target):
    """Flushes the finished `temporary` and renames it onto `target` (atomic for files)."""
    for path in [*temporary.rglob("*"), temporary] if temporary.is_dir() else [temporary]:
        _sync(path)
    if temporary.is_dir():
        _replace_folder(temporary, target)
    else:
        os.replace(temporary, target)
    _sync(target.parent)


@contextlib.contextmanager
def write_errors(path):
    """Turns what the system refuses while the block writes `path` into an `InputError`
    naming the reason (full disk, read-only folder...); a writer failing on a full file
    system counts as refused, since h5py and TensorFlow do not always say so in an OSError.

    Example:
        >>> with write_errors("out/results.json"):
        ...     Path("out/results.json").write_text(text)
        InputError: could not write 'out/results.json': No space left on device; free some space ...
    """
    try:
        yield
    except KerasEmbedError:
        raise
    except Exception as error:
        code = error.errno if isinstance(error, OSError) and error.errno in _WRITE_FIXES else None
        if code is None and _is_full(_target(path).parent):
            code = errno.ENOSPC
        if code is None:
            raise
        raise InputError(f"could not write '{path}': {os.strerror(code)}; {_WRITE_FIXES[code]} "
                         "(nothing was written)") from None


def _publish_all(outputs):
    """Re-checks every target, then renames the temporaries into place, the last written first."""
    for output in outputs:
        _refuse_special(output.target, output.path)  # it may have become one since the checks before the work
    for output in reversed(outputs):
        with write_errors(output.path):
            _publish(output.temporary, output.target)


@contextlib.contextmanager
def published_together():
    """Outputs written in the block (`save_model`, `write_text`) wait beside their targets
    and are renamed into place together when it ends; when it raises, none is.

    They are renamed the last written first: a model written before its report is only
    published once the report is complete.

    Example:
        >>> with published_together():
        ...     save_model(model, "out/model.keras")
        ...     write_text("out/report.json", report)  # if this fails, no model is published
    """
    staged = []
    token = _STAGED.set(staged)
    try:
        yield
        _publish_all(staged)
    finally:
        _STAGED.reset(token)
        for output in staged:
            _remove(output.temporary)  # what was not published


def _write(target, path, suffix, produce):
    """Runs `produce(temporary)`, then publishes the temporary at `target` (or stages it
    in `published_together`); nothing is left behind when anything fails."""
    output = _Output(_temporary(target, suffix), target, path)
    staged, waiting = _STAGED.get(), False
    try:
        with write_errors(path):
            produce(output.temporary)
        if staged is None:
            _publish_all([output])
        else:
            staged.append(output)  # published, or removed, when the block ends
            waiting = True
    finally:
        if not waiting:
            _remove(output.temporary)


SEVERAL_IO_FORMATS = ("keras", "h5", "savedmodel", "tflite")  # written and verified with several inputs or outputs


def check_io_format(model, format, tf_keras=False, quantize=None):
    """Refuses (`InputError`) to write a model of several inputs or outputs as ONNX or with
    tf_keras (those writers take one input and one output), or as int8 TFLite with several
    inputs (its representative data is one array).

    Example:
        >>> check_io_format(two_input_model, "onnx")
        InputError: model 'two_io' has 2 inputs and 2 outputs; onnx output takes one of each: write .keras, .h5, ...
    """
    several = len(model.inputs) > 1 or len(model.outputs) > 1
    if several and (format not in SEVERAL_IO_FORMATS or tf_keras):
        shown = f"tf_keras {format}" if tf_keras else format
        raise InputError(f"model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         f"{shown} output takes one of each: write .keras, .h5, a SavedModel or .tflite")
    if len(model.inputs) > 1 and quantize == "int8":
        raise InputError(f"model '{model.name}' has {len(model.inputs)} inputs; --quantize int8 calibrates on one "
                         "input array: use --quantize float16 or none")
    import keras

    from keras_embed.verify import layers_within  # imports Keras, which the checks above do not need

    recurrent = (keras.layers.RNN, keras.layers.Bidirectional)
    for layer in (layer for layer in layers_within(model) if isinstance(layer, recurrent)) if format == "tflite" else ():
        sequence = layer.input[0] if isinstance(layer.input, (list, tuple)) else layer.input  # [sequence, mask]
        if sequence.shape[1] is None:
            raise InputError(f"layer '{layer.name}' is recurrent and reads sequences of any length: TFLite output "
                             "unrolls it over a fixed number of steps; build the model on keras.Input((steps, ...)) "
                             "or write .keras, .h5 or a SavedModel")


def save_model(model, path, format=None, writer=None, check=None):
    """Writes `model` atomically: into a temporary path beside `path`, then renamed.

    Args:
        model: the Keras model.
        path: target; the format comes from it unless `format` is given.
        format: one of `FORMATS`.
        writer: `writer(model, temporary_path)` instead of the format's own writer
            (quantized TFLite, tf_keras, ONNX: see `export`).
        check: `check(temporary_path)`, called on what was written before it is renamed
            into place; what it raises leaves the target untouched.

    Returns:
        The path written.

    Raises:
        InputError: the target is (or became) a device, FIFO, socket or unrelated folder,
            or the system refused the write (full disk, read-only folder...), or a model of
            several inputs or outputs in a format that takes one of each (`check_io_format`).
    """
    format = output_format(path, format)
    check_io_format(model, format)
    target = _target(path)
    _check_replaceable(target, path, format)
    write = writer or _WRITERS[format]

    def produce(temporary):
        write(model, temporary)
        if check is not None:
            check(temporary)

    _write(target, path, _TEMP_SUFFIXES[format], produce)
    return str(path)


def _create(path, data):
    with open(path, "xb") as handle:  # exclusive: never opens what is already there
        handle.write(data)


def write_bytes(path, data):
    """Writes a file atomically (images, reports); see `save_model` for what it raises."""
    _write(_target(path), path, "", lambda temporary: _create(temporary, data))


def write_text(path, text):
    """Writes a UTF-8 text file atomically (reports, JSON)."""
    write_bytes(path, text.encode())

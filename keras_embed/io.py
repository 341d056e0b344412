"""Model files: safe loading, and atomic writing in every export format.

Loading always uses Keras safe mode unless the caller opts out, and refuses files whose
archive members point outside the archive or whose config declares far more weights than
the file stores (Keras would allocate them before failing). Writing goes to a temporary
path beside the target (`.NAME.PID.tmp...`), is flushed to disk and renamed into place, so
a failed or killed write never leaves a partial model at the target: the target is the
old file or the new one, and a killed writer leaves at most its hidden temporary behind.

Example:
    >>> model = load_model("saved_models/digits_widened.keras")
    >>> save_model(model, "out/model.tflite")          # format from the extension
    'out/model.tflite'
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PureWindowsPath

import h5py
import keras

from keras_embed.errors import InputError, UnsupportedLayerError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
FORMATS = ("keras", "h5", "savedmodel", "tflite", "onnx")
_SUFFIX_FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".tflite": "tflite", ".onnx": "onnx"}
_CONFIG_LIMIT = 16 * 2**20  # a larger config.json is not parsed for the weights check
_SHAPE_KEYS = ("batch_shape", "batch_input_shape", "input_shape")
_WEIGHTS_PER_BYTE = 8  # generous: a quantized layer stores one weight in half a byte
_SLACK_BYTES = 2**20
_DEFLATE_RATIO = 1032  # the most a zip member can expand: a larger declared size is a lie
HDF5_TIMEOUT = 30  # seconds the isolated first read of an .h5 file's metadata may take
_HDF5_PROBE = """
import json, sys, h5py
def read_attributes(name, item):
    for key in item.attrs:
        item.attrs[key]
with h5py.File(sys.argv[1], "r") as file:
    read_attributes("/", file)
    file.visititems(read_attributes)
    config, version = file.attrs.get("model_config"), file.attrs.get("keras_version")
text = lambda value: value.decode() if isinstance(value, bytes) else str(value or "")
sys.stdout.write(json.dumps({"config": text(config), "keras_version": text(version)}))
"""


def _first_line(error, limit=200):
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_model_path(path):
    if not path.exists():
        raise InputError(f"model file '{path}' not found; check the path")
    if path.is_dir():
        if (path / "keras_metadata.pb").exists() or (path / "saved_model.pb").exists():
            raise UnsupportedLayerError(
                f"'{path}' is a SavedModel, which keeps no Keras layers; pass the .keras or .h5 file it came from"
            )
        raise InputError(f"'{path}' is a folder, not a model file; pass a .keras or .h5 file")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise InputError(f"unknown model format '{path.suffix or path.name}' of '{path}'; pass a .keras or .h5 file")
    if path.stat().st_size == 0:
        raise InputError(f"model file '{path}' is empty; re-save the model with model.save()")
    kinds = {".keras": zipfile.is_zipfile(path), ".h5": h5py.is_hdf5(path)}
    expected = ".keras" if path.suffix.lower() == ".keras" else ".h5"
    if not kinds[expected]:
        actual = next((suffix for suffix, found in kinds.items() if found), None)
        if actual is not None:
            raise InputError(f"model file '{path}' is a {actual} file despite its name; rename it to end in {actual}")
        kind = "a .keras archive (zip)" if expected == ".keras" else "an HDF5 file"
        raise InputError(f"model file '{path}' is not {kind}: truncated or corrupt; re-save it with model.save()")
    _check_contents(path)


def _escapes(name):
    """Whether an archive member would be extracted outside its folder (absolute or '..')."""
    member = PureWindowsPath(name)  # reads '/' and '\\' separators and drive letters alike
    return bool(member.drive or member.root) or ".." in member.parts


def _size(value):
    """A positive integer size from a config value, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _last_size(shape):
    return _size(shape[-1]) if isinstance(shape, list) and shape else 0


_LAYER_WEIGHTS = {  # weights Keras allocates for a layer, from its input width and config
    "Dense": lambda inputs, config: (inputs + 1) * _size(config.get("units")),
    "BatchNormalization": lambda inputs, config: 4 * inputs,
}


def declared_weights(config_text):
    """Number of weights the Dense and BatchNormalization layers of a model config declare
    (0 if the text is not JSON).

    A layer's input width comes from its build_config; where that is missing it counts as
    the widest width the config names, so the figure bounds what Keras allocates for them.

    Example:
        >>> declared_weights('{"class_name": "Dense", "config": {"units": 3}, '
        ...                  '"build_config": {"input_shape": [null, 4]}}')
        15
    """
    try:
        config = json.loads(config_text)
    except (TypeError, ValueError, RecursionError):
        return 0
    layers, widths, stack = [], [0], [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if str(node.get("class_name")) in _LAYER_WEIGHTS and isinstance(node.get("config"), dict):
                layers.append(node)
                widths.append(_size(node["config"].get("units")))
            widths += [_last_size(node[key]) for key in _SHAPE_KEYS if key in node]
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    total = 0
    for layer in layers:
        build = layer.get("build_config")
        inputs = (_last_size(build.get("input_shape")) if isinstance(build, dict) else 0) or max(widths)
        total += _LAYER_WEIGHTS[layer["class_name"]](inputs, layer["config"])
    return total


def hdf5_metadata(path):
    """{'config': model config text, 'keras_version': writer's Keras version} of an .h5 file,
    read with every attribute in a child process first.

    A damaged file can send the HDF5 library into an endless loop that no Python code can
    interrupt (found by fuzzing: one byte inserted into the config text); the child is
    stopped after `HDF5_TIMEOUT` seconds instead.
    """
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _HDF5_PROBE, str(path)], capture_output=True,
                              timeout=HDF5_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InputError(f"model file '{path}' is a damaged HDF5 file: reading its metadata did not finish in "
                         f"{HDF5_TIMEOUT} s; re-save it with model.save()") from None
    if done.returncode != 0:
        reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["it crashed the reader"])[-1]
        raise InputError(f"model file '{path}' is a damaged HDF5 file ({_first_line(reason)}); "
                         "re-save it with model.save()")
    return json.loads(done.stdout.decode(errors="replace"))


def _config_and_stored_bytes(path):
    """(config JSON text or None, bytes of everything else) of a .keras or .h5 file;
    sizes an archive declares count only as far as its stored bytes can expand."""
    if path.suffix.lower() != ".keras":
        return hdf5_metadata(path)["config"], path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        escaping = [member.filename for member in members if _escapes(member.filename)]
        if escaping:
            raise InputError(
                f"model file '{path}' holds an archive member '{escaping[0]}' that points outside the archive; "
                "it is corrupt or was tampered with: do not use it, re-save the model with model.save()"
            )
        config = next((member for member in members if member.filename == "config.json"), None)
        text = archive.read(config) if config is not None and config.file_size <= _CONFIG_LIMIT else None
        return text, sum(min(member.file_size, _DEFLATE_RATIO * member.compress_size)
                         for member in members if member is not config)


def _check_contents(path):
    """Refuses what Keras would act on before its own checks: archive members that escape
    the extraction folder, and configs declaring far more weights than the file stores."""
    try:
        text, stored = _config_and_stored_bytes(path)
    except InputError:
        raise
    except Exception:  # unreadable: Keras's own error follows, mapped in load_model
        return
    declared = declared_weights(text)
    if declared > _WEIGHTS_PER_BYTE * (stored + _SLACK_BYTES):
        raise InputError(
            f"model file '{path}' declares {declared} weights but stores only {stored} bytes; "
            "it is corrupt or was tampered with: re-save the model with model.save()"
        )


def check_model_file(path):
    """Refuses a model file that `load_model` would refuse before reading it (see there).

    Example:
        >>> check_model_file("missing.keras")
        InputError: model file 'missing.keras' not found; check the path
    """
    _check_model_path(Path(path))


def load_model(path, unsafe=False):
    """Loads a `.keras` or `.h5` model, uncompiled, in Keras safe mode.

    Args:
        path: the model file.
        unsafe: turn safe mode off. Safe mode refuses to run code stored in the file
            (Lambda layers, pickled functions): only for files you trust.

    Raises:
        InputError: missing, empty, corrupt or code-carrying files, unknown extensions,
            archive members that point outside the archive, configs declaring far more
            weights than the file stores, .h5 files whose metadata cannot be read in
            `HDF5_TIMEOUT` seconds.
        UnsupportedLayerError: custom layer classes Keras cannot find.
    """
    path = Path(path)
    _check_model_path(path)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as error:  # Keras raises many types for unreadable files
        message = str(error)
        if "safe_mode" in message or "unsafe" in message.lower():
            raise InputError(
                f"model '{path}' holds code (e.g. a Lambda layer) that safe mode refuses to run; "
                "pass --unsafe only if you trust the file"
            ) from None
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", message)
        if missing or "Unknown layer" in message:
            raise UnsupportedLayerError(
                f"model '{path}' uses a custom class keras-embed cannot load "
                f"({missing.group(1) if missing else _first_line(error)}); "
                "only stock Keras layers are supported: rebuild the model from them"
            ) from None
        raise InputError(
            f"could not read model '{path}' ({_first_line(error)}): it is incomplete, corrupt or not a Keras model; "
            "re-save it with model.save()"
        ) from None


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


def _check_target(path, taken):
    """Common checks of anything keras-embed will write at `path`."""
    target = _target(path).resolve()
    if any(target == _target(other).resolve() for other in taken if other is not None):
        raise InputError(f"output '{path}' is also the model input or another output; choose another path")
    if not target.parent.is_dir():
        raise InputError(f"output folder '{target.parent}' does not exist; create it first")
    if not os.access(target.parent, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise InputError(f"output folder '{target.parent}' is not writable; choose another path")
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
    """
    target = _check_target(path, taken)
    if target.is_dir():
        raise InputError(f"'{path}' is a folder; give a file path")
    _check_new(target, path, overwrite)


def check_output(path, input_path=None, format=None, overwrite=False):
    """Validates a model output path before any work is done; returns its format.

    An existing output is refused unless `overwrite`; even then only a file, or a
    SavedModel folder when writing one, is replaced, so no unrelated file is ever deleted.

    Raises:
        InputError: unknown format, output equal to (or holding) the input, an existing
            output without `overwrite`, a folder that is not a SavedModel, missing or
            read-only folder.
    """
    format = output_format(path, format)
    target = _check_target(path, (input_path,))
    source = None if input_path is None else _target(input_path).resolve()
    _check_replaceable(target, path, format)
    if source is not None and target in source.parents:
        raise InputError(f"output '{path}' is a folder holding the input model; choose a new path")
    _check_new(target, path, overwrite)
    return format


def _check_replaceable(target, path, format):
    """Only a file, or a SavedModel folder when writing one, may be replaced."""
    if target.is_dir() and (format != "savedmodel" or not (target / "saved_model.pb").is_file()):
        raise InputError(f"output '{path}' is an existing folder that is not a SavedModel; choose a new path")


def _write_tflite(model, path):
    from keras_embed.export import write_tflite

    write_tflite(model, path)


def _write_keras(model, path):
    model.save(path)  # the suffix picks .keras or legacy .h5


def _write_savedmodel(model, path):
    model.export(str(path), format="tf_saved_model", verbose=False)


def _write_onnx(model, path):
    from keras_embed.export import write_onnx  # needs the optional onnx extra

    write_onnx(model, path)


_WRITERS = {"keras": _write_keras, "h5": _write_keras, "savedmodel": _write_savedmodel, "tflite": _write_tflite,
            "onnx": _write_onnx}
_TEMP_SUFFIXES = {"keras": ".keras", "h5": ".h5", "savedmodel": "", "tflite": ".tflite", "onnx": ".onnx"}


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _temporary(target, suffix=""):
    """The hidden temporary path beside `target` that this process writes first."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")


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
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
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
    """
    format = output_format(path, format)
    target = _target(path)
    _check_replaceable(target, path, format)
    temporary = _temporary(target, _TEMP_SUFFIXES[format])
    try:
        (writer or _WRITERS[format])(model, temporary)
        if check is not None:
            check(temporary)
        _publish(temporary, target)
    finally:
        _remove(temporary)
    return str(path)


def write_text(path, text):
    """Writes a text file atomically (reports, JSON)."""
    target = _target(path)
    temporary = _temporary(target)
    try:
        temporary.write_text(text)
        _publish(temporary, target)
    finally:
        _remove(temporary)

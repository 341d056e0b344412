"""Model files: safe loading, and atomic writing in every export format.

Loading always uses Keras safe mode unless the caller opts out. Writing goes to a
temporary path beside the target and is renamed into place, so a failed or killed write
never leaves a partial model at the target.

Example:
    >>> model = load_model("saved_models/digits_widened.keras")
    >>> save_model(model, "out/model.tflite")          # format from the extension
    'out/model.tflite'
"""

import os
import shutil
import zipfile
from pathlib import Path

import h5py
import keras

from keras_embed.errors import InputError, UnsupportedLayerError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
FORMATS = ("keras", "h5", "savedmodel", "tflite")
_SUFFIX_FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".tflite": "tflite"}


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
    valid = zipfile.is_zipfile(path) if path.suffix.lower() == ".keras" else h5py.is_hdf5(path)
    if not valid:
        kind = "a .keras archive (zip)" if path.suffix.lower() == ".keras" else "an HDF5 file"
        raise InputError(f"model file '{path}' is not {kind}: truncated or corrupt; re-save it with model.save()")


def load_model(path, unsafe=False):
    """Loads a `.keras` or `.h5` model, uncompiled, in Keras safe mode.

    Args:
        path: the model file.
        unsafe: turn safe mode off. Safe mode refuses to run code stored in the file
            (Lambda layers, pickled functions): only for files you trust.

    Raises:
        InputError: missing, empty, corrupt or code-carrying files, unknown extensions.
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
        if "Could not locate" in message or "Unknown layer" in message:
            raise UnsupportedLayerError(
                f"model '{path}' uses a custom class keras-embed cannot load ({_first_line(error)}); "
                "only stock Keras layers are supported"
            ) from None
        raise InputError(
            f"could not read model '{path}' ({_first_line(error)}); is it a complete .keras or .h5 file?"
        ) from None


def output_format(path, format=None):
    """The export format for `path`: `format` if given, else from its ending.

    A path ending in '/' is a SavedModel folder; '.keras', '.h5' and '.tflite' name theirs.
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
            f"cannot tell the format of output '{path}'; end it with .keras, .h5, .tflite or / (SavedModel), "
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
    if not os.access(target.parent, os.W_OK):
        raise InputError(f"output folder '{target.parent}' is not writable; choose another path")
    return target


def check_side_output(path, *taken):
    """Validates the path of a report or other side file before any work is done.

    Args:
        path: the side file.
        taken: paths it must not overwrite (the input model, the output model).
    """
    if _check_target(path, taken).is_dir():
        raise InputError(f"'{path}' is a folder; give a file path")


def check_output(path, input_path=None, format=None):
    """Validates a model output path before any work is done; returns its format.

    An existing SavedModel folder may be replaced; any other existing folder is refused,
    so no unrelated file is ever deleted.

    Raises:
        InputError: unknown format, output equal to (or holding) the input, a folder that is
            not a SavedModel, missing or read-only folder.
    """
    format = output_format(path, format)
    target = _check_target(path, (input_path,))
    source = None if input_path is None else _target(input_path).resolve()
    _check_replaceable(target, path, format)
    if source is not None and target in source.parents:
        raise InputError(f"output '{path}' is a folder holding the input model; choose a new path")
    return format


def _check_replaceable(target, path, format):
    """Only a file, or a SavedModel folder when writing one, may be replaced."""
    if target.is_dir() and (format != "savedmodel" or not (target / "saved_model.pb").is_file()):
        raise InputError(f"output '{path}' is an existing folder that is not a SavedModel; choose a new path")


def _write_tflite(model, path):
    import tensorflow as tf  # only this format needs TensorFlow directly

    Path(path).write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def _write_keras(model, path):
    model.save(path)  # the suffix picks .keras or legacy .h5


def _write_savedmodel(model, path):
    model.export(str(path), format="tf_saved_model", verbose=False)


_WRITERS = {"keras": _write_keras, "h5": _write_keras, "savedmodel": _write_savedmodel, "tflite": _write_tflite}
_TEMP_SUFFIXES = {"keras": ".keras", "h5": ".h5", "savedmodel": "", "tflite": ".tflite"}


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(temporary, target):
    """Moves `temporary` onto `target`; an existing folder is swapped out, then removed."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
        os.replace(temporary, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, target)


def save_model(model, path, format=None):
    """Writes `model` atomically: into a temporary path beside `path`, then renamed.

    Args:
        model: the Keras model.
        path: target; the format comes from it unless `format` is given.
        format: one of `FORMATS`.

    Returns:
        The path written.
    """
    format = output_format(path, format)
    target = _target(path)
    _check_replaceable(target, path, format)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp{_TEMP_SUFFIXES[format]}")
    try:
        _WRITERS[format](model, temporary)
        _replace(temporary, target)
    finally:
        _remove(temporary)
    return str(path)


def write_text(path, text):
    """Writes a text file atomically (reports, JSON)."""
    target = _target(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, target)
    finally:
        _remove(temporary)

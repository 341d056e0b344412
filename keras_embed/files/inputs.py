"""Every model input kind keras-embed reads, and the output format that follows from it.

    keras                .keras archive (Keras 3)
    h5                   .h5 written by Keras 3
    tf_keras_h5          .h5 written by tf_keras / Keras 2 (keras_version 2.x)
    tf_keras_savedmodel  SavedModel folder with keras_metadata.pb (tf_keras model.save)
    savedmodel           SavedModel folder without Keras metadata (model.export, TF Serving)

tf_keras inputs are read by tf_keras in a child process (`files.tf_keras_bridge`); without
tf_keras installed, a tf_keras .h5 file is read by Keras 3's legacy loader and a tf_keras
SavedModel by its serving graph (`files.savedmodel`), and the notes say so. A tf_keras
model whose config holds code is refused before either loader sees it (`tf_keras_code`),
unless `unsafe`.

Example:
    >>> kind = input_kind("legacy_model/")
    >>> model, notes = load_input("legacy_model/", kind)
    >>> kind, resolve_output("out/pruned", kind)
    ('tf_keras_savedmodel', ('out/pruned', 'savedmodel'))
"""

from pathlib import Path

from keras_embed.errors import InputError
from keras_embed.files.load import check_model_file, hdf5_metadata, load_model

KINDS = ("keras", "h5", "tf_keras_h5", "tf_keras_savedmodel", "savedmodel")
_OWN_FORMATS = {"keras": "keras", "h5": "h5", "tf_keras_h5": "h5", "tf_keras_savedmodel": "savedmodel",
                "savedmodel": "savedmodel"}
_SUFFIXES = {"keras": ".keras", "h5": ".h5", "savedmodel": ""}


def input_kind(path):
    """One of `KINDS` for a model path, or None when it is none of them (then
    `io.load_model` names the problem)."""
    path = Path(path)
    if path.is_dir():
        if (path / "keras_metadata.pb").is_file():
            return "tf_keras_savedmodel"
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        return None
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "keras"
    if suffix in (".h5", ".hdf5"):
        check_model_file(path)
        return "tf_keras_h5" if hdf5_metadata(path)["keras_version"].startswith("2.") else "h5"
    return None


def load_input(path, kind, unsafe=False):
    """Loads a model of `kind` (from `input_kind`) as a Keras 3 model.

    Returns:
        (model, notes): notes is a dict saying how it was read (read_with, and for
        tf_keras inputs the layer classes and whether tfmot wrappers were stripped).

    Raises:
        InputError, UnsupportedLayerError: as `io.load_model`, `read_tf_keras` and
            `read_savedmodel` do.
    """
    from keras_embed.files.savedmodel import read_savedmodel
    from keras_embed.files.savedmodel_read import check_saved_model
    from keras_embed.files.tf_keras_bridge import read_tf_keras, tf_keras_installed
    from keras_embed.files.tf_keras_code import refuse_code

    if kind == "savedmodel":
        return read_savedmodel(path), {"read_with": "serving graph"}
    if kind in ("tf_keras_h5", "tf_keras_savedmodel"):
        if kind == "tf_keras_savedmodel" and not unsafe:
            check_saved_model(path)  # TensorFlow loads its graph in the tf_keras child
        if tf_keras_installed():
            model, notes = read_tf_keras(path, unsafe)
            return model, {"read_with": "tf_keras", **notes}
        if kind == "tf_keras_savedmodel":
            return read_savedmodel(path), {"read_with": "serving graph (tf_keras is not installed)"}
        refuse_code(path, unsafe)
        return load_model(path, unsafe), {"read_with": "Keras 3 legacy .h5 loader (tf_keras is not installed)"}
    return load_model(path, unsafe), {"read_with": "keras"}


def resolve_output(output, kind, format=None, keep_format=False):
    """(path, format) to write: `format`, else the input's own format when `keep_format`
    or when `output` has no extension (the extension is then added; a SavedModel is a
    folder), else the format `output` names.

    Raises:
        InputError: `keep_format` with a `format` or an extension naming another one.
    """
    from keras_embed.files.save import output_format

    own = _OWN_FORMATS.get(kind)
    if keep_format:
        if own is None:
            raise InputError("--keep-format needs an input of a known kind (.keras, .h5 or a SavedModel folder)")
        named = format or (output_format(output) if Path(output).suffix or str(output).endswith("/") else None)
        if named not in (None, own):
            raise InputError(f"--keep-format writes the input's format ({own}) but the output asks for {named}; "
                             "drop one of them")
        format = own
    if format is None and own is not None and not Path(output).suffix and not str(output).endswith("/"):
        format = own
    if format is not None and not Path(output).suffix and _SUFFIXES.get(format):
        output = str(output) + _SUFFIXES[format]
    return str(output), format


def writes_tf_keras(kind, keep_format):
    """Whether the output is written by tf_keras: `--keep-format` of a tf_keras input."""
    return keep_format and kind in ("tf_keras_h5", "tf_keras_savedmodel")

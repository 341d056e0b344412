"""Code that a tf_keras model file would make tf_keras run, found on its parsed config.

tf_keras (Keras 2) has no safe mode for its legacy formats: loading an `.h5` file or a
SavedModel turns a Lambda layer's stored bytecode into a function and calls it, a
TFOpLambda or TensorFlowOpLayer runs whatever TensorFlow op its config names, and a
serialized object naming a Python module makes tf_keras import that module and take a
function or class from it. So before tf_keras sees a file, its configs are parsed (the
`.h5` file's `model_config`; the JSON metadata of every node of a SavedModel's
`keras_metadata.pb`) and every object in them, however deeply nested (sub-models,
wrappers, cells), is checked for:

- a class that carries code: `CODE_CLASSES` (by class or registered name);
- a function stored as bytecode: any `*_type` entry saying "lambda" (Lambda's
  `function_type`, the RNN cell wrappers' `dropout_fn_type`, ...);
- a module outside Keras (`keras`, `tf_keras`), or a dotted name reaching through one.

Deciding on the parsed JSON, never its text, makes respellings (JSON escapes such as
`"\\u004cambda"`, duplicate keys) irrelevant. The child that loads the file refuses the
same things again (`tf_keras_child.py`), in case anything slipped past.

Example:
    >>> code_in_config('{"class_name": "\\\\u004cambda", "config": {}}')
    'a Lambda layer'
"""

import functools
import json
import re
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from keras_embed.errors import InputError

CODE_CLASSES = {  # class name: what it is, for messages (tf_keras_child.CODE_LAYERS: the layers among them)
    "Lambda": "a Lambda layer",
    "TFOpLambda": "a TFOpLambda layer",
    "SlicingOpLambda": "a SlicingOpLambda layer",
    "ClassMethod": "a ClassMethod layer",
    "InstanceMethod": "an InstanceMethod layer",
    "InstanceProperty": "an InstanceProperty layer",
    "TensorFlowOpLayer": "a TensorFlowOpLayer",
    "__lambda__": "a Python lambda",
}
KERAS_PACKAGES = ("keras", "tf_keras")
METADATA_LIMIT = 64 * 2**20  # bytes of keras_metadata.pb read at most
_CODE_NAMES = {name.casefold(): what for name, what in CODE_CLASSES.items()}


def code_refused(path, what):
    """The `InputError` for a model at `path` that holds code (`what` says which)."""
    return InputError(f"model '{path}' holds code ({what}) that safe mode refuses to run; "
                      "pass --unsafe only if you trust the file")


def _code_class(name):
    """The description in `CODE_CLASSES` of the class a class or registered name means, or
    None: 'keras.layers.Lambda', 'Custom>Lambda' and 'lambda' all mean 'Lambda'."""
    return _CODE_NAMES.get(re.split(r"[.>/]", name)[-1].casefold())


def _keras_module(module):
    return module.split(".")[0] in KERAS_PACKAGES


def _code_in_object(pairs):
    """Descriptions of the code one serialized object names (its JSON key-value pairs,
    duplicate keys included)."""
    imported = any(key == "module" for key, _ in pairs)
    for key, value in pairs:
        if not isinstance(value, str):
            continue
        if key in ("class_name", "registered_name") and _code_class(value):
            yield _code_class(value)
        if key.endswith("_type") and value.casefold() == "lambda":
            yield f"a Python function stored as bytecode ({ascii(key)})"
        if key == "module" and not _keras_module(value):
            yield f"a function or class from the Python module {ascii(value)}"
        if imported and key in ("class_name", "config") and "." in value:
            yield f"a function or class reached through {ascii(value)}"


def code_in_config(text):
    """What code a tf_keras JSON config (text) holds: a description (a code-carrying class
    where there is one), or None (also for an empty text: tf_keras builds nothing from it).

    Raises:
        ValueError, RecursionError: the text is not JSON, or nested too deeply to parse.

    Example:
        >>> code_in_config('{"class_name": "Dense", "config": {"units": 3}}') is None
        True
    """
    if not text:
        return None
    found = []

    def check(pairs):
        found.extend(_code_in_object(pairs))
        named = dict(pairs)
        if named.get("class_name") == "__bytes__":  # tf_keras decodes it to the string it holds
            return named.get("value")
        return named

    json.loads(text, object_pairs_hook=check)
    return min(found, key=lambda what: what not in CODE_CLASSES.values(), default=None)


@functools.cache
def _saved_metadata_message():
    """The `SavedMetadata` message class of tf_keras/protobuf/saved_metadata.proto, built
    from that schema (tf_keras's own module would import tf_keras into this process)."""
    schema = descriptor_pb2.FileDescriptorProto(name="keras_embed/saved_metadata.proto", package="keras_embed",
                                                syntax="proto3")
    node = schema.message_type.add(name="SavedObject")
    for name, number, kind in (("node_id", 2, "INT32"), ("node_path", 3, "STRING"), ("identifier", 4, "STRING"),
                               ("metadata", 5, "STRING")):
        node.field.add(name=name, number=number, type=getattr(descriptor_pb2.FieldDescriptorProto, f"TYPE_{kind}"),
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    schema.message_type.add(name="SavedMetadata").field.add(
        name="nodes", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED, type_name=".keras_embed.SavedObject")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(schema.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("keras_embed.SavedMetadata"))


def saved_model_configs(folder):
    """The JSON metadata of every node of a tf_keras SavedModel's `keras_metadata.pb`.

    Raises:
        InputError: the file is missing, larger than `METADATA_LIMIT` or not a SavedMetadata
            message.
    """
    path = Path(folder) / "keras_metadata.pb"
    if not path.is_file():
        raise InputError(f"'{folder}' holds no keras_metadata.pb, so it is no tf_keras SavedModel; "
                         "pass the folder tf_keras model.save() wrote")
    if path.stat().st_size > METADATA_LIMIT:
        raise InputError(f"model '{folder}' has a keras_metadata.pb of {path.stat().st_size} bytes, more than "
                         f"keras-embed reads ({METADATA_LIMIT // 2**20} MiB); re-save the model with model.save()")
    message = _saved_metadata_message()()
    try:
        message.ParseFromString(path.read_bytes())
    except DecodeError as error:
        raise InputError(f"model '{folder}' has a damaged keras_metadata.pb ({error}); "
                         "re-save the model with model.save()") from None
    return [node.metadata for node in message.nodes]


def model_configs(path):
    """The JSON configs tf_keras builds a model from: an `.h5` file's `model_config`, or
    the node metadata of a SavedModel folder."""
    from keras_embed.files.load import hdf5_metadata

    return saved_model_configs(path) if Path(path).is_dir() else [hdf5_metadata(path)["config"]]


def refuse_code(path, unsafe=False):
    """Raises `InputError` when the tf_keras model at `path` holds code, unless `unsafe`.

    Example:
        >>> refuse_code("lambda.h5")
        InputError: model 'lambda.h5' holds code (a Lambda layer) that safe mode refuses to run; ...
    """
    if unsafe:
        return
    for text in model_configs(path):
        try:
            what = code_in_config(text)
        except (ValueError, RecursionError) as error:
            raise InputError(f"model '{path}' has a config that is not valid JSON ({str(error)[:100]}); "
                             "re-save the model with model.save()") from None
        if what is not None:
            raise code_refused(path, what)

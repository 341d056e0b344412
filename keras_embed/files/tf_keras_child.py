"""The tf_keras side of `files.tf_keras_bridge`, run as its own process.

Importing tf_keras or tensorflow-model-optimization switches a process to legacy Keras
(TF_USE_LEGACY_KERAS), so keras-embed never imports them: it starts this script, which
imports nothing from keras_embed. Commands:

    read SRC DST.h5 [--unsafe]
                          load a tf_keras .h5 file or SavedModel folder (stripping tfmot's
                          pruning wrappers when tfmot is installed), save it as .h5
    write CONFIG WEIGHTS DST h5|tf
                          build a model from a tf_keras JSON config and an .npz of weights
                          (arr_0, arr_1, ... in get_weights order), save it
    predict MODEL X.npy OUT.npy
                          load a tf_keras model and write its outputs on X

Without --unsafe, tf_keras refuses here to deserialise code from a file (`forbid_code`),
whatever the caller checked before: a refusal ends the command with exit code 6 before
the code runs.

Exit codes: 0 ok, 2 unreadable input, 4 unsupported model, 5 tf_keras not installed,
6 the model holds code (refused); the reason is the last line of stderr. stdout carries
one JSON object (read: what was done).

Example:
    python keras_embed/files/tf_keras_child.py read legacy_model/ /tmp/model.h5
"""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


UNSAFE = "--unsafe"
# The layers that run a function or op their config names, and what they are (for messages):
# the layers of CODE_CLASSES in keras_embed/files/tf_keras_code.py (this script imports nothing from
# keras_embed).
CODE_LAYERS = {
    "Lambda": "a Lambda layer",
    "TFOpLambda": "a TFOpLambda layer",
    "SlicingOpLambda": "a SlicingOpLambda layer",
    "ClassMethod": "a ClassMethod layer",
    "InstanceMethod": "an InstanceMethod layer",
    "InstanceProperty": "an InstanceProperty layer",
    "TensorFlowOpLayer": "a TensorFlowOpLayer",
}
KERAS_PACKAGES = ("keras", "tf_keras")
REFUSED = []  # what tf_keras was about to deserialise and was refused


def _fail(message, code):
    sys.stderr.write(message.replace("\n", " ") + "\n")
    sys.exit(code)


def _import_tf_keras():
    try:
        import tf_keras
    except ImportError:
        _fail("tf_keras is not installed", 5)
    return tf_keras


class CodeRefused(BaseException):
    """Raised where tf_keras would deserialise code. Not an `Exception`: tf_keras catches
    those while reviving a SavedModel layer and falls back to its traced graph."""


def _refuse(what):
    REFUSED.append(what)
    raise CodeRefused(what)


def _refusing(what):
    return lambda *args, **kwargs: _refuse(what)


def _from_keras_only(retrieve):
    """tf_keras's lookup of a serialized function or class, refusing a module outside Keras
    (tf_keras would import it) and a dotted name (reaching through a module)."""

    def retrieve_from_keras(name, registered_name, module, *args, **kwargs):
        if module and (module.split(".")[0] not in KERAS_PACKAGES or "." in name):
            _refuse(f"a function or class {ascii(name)} from the Python module {ascii(module)}")
        return retrieve(name, registered_name, module, *args, **kwargs)

    return retrieve_from_keras


def forbid_code():
    """Makes tf_keras refuse, for the rest of this process, to deserialise code: its one
    bytecode loader (`func_load`, behind Lambda layers, `__lambda__` objects and the RNN
    cell wrappers), the `CODE_LAYERS`, and functions or classes from outside Keras; and
    turns on tf_keras's own safe mode, which its legacy formats otherwise ignore."""
    from tf_keras.src.layers import serialization
    from tf_keras.src.saving import serialization_lib
    from tf_keras.src.utils import generic_utils

    generic_utils.func_load = _refusing("a Python function stored as bytecode")
    serialization.populate_deserializable_objects()
    for name, what in CODE_LAYERS.items():
        if name in serialization.LOCAL.ALL_OBJECTS:  # a class this tf_keras lacks cannot be built either
            serialization.LOCAL.ALL_OBJECTS[name].from_config = classmethod(_refusing(what))
    serialization_lib._retrieve_class_or_fn = _from_keras_only(serialization_lib._retrieve_class_or_fn)
    serialization_lib.SafeModeScope(True).__enter__()


def _strip_tfmot(tf_keras, source):
    """Loads a model still wrapped for pruning and strips the wrappers (needs tfmot)."""
    try:
        import tensorflow_model_optimization as tfmot
    except ImportError:
        return None
    with tfmot.sparsity.keras.prune_scope():
        model = tf_keras.models.load_model(source, compile=False)
    return tfmot.sparsity.keras.strip_pruning(model)


def read(source, target):
    tf_keras = _import_tf_keras()
    stripped = False
    try:
        model = tf_keras.models.load_model(source, compile=False)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        model = _strip_tfmot(tf_keras, source) if "PruneLowMagnitude" in str(error) else None
        if model is None:
            unknown = "Unknown layer" in message or "Could not locate" in message
            _fail(f"tf_keras cannot load it ({message[:200]})", 4 if unknown else 2)
        stripped = True
    if not model._is_graph_network:
        _fail(f"it holds a subclassed tf_keras model ({type(model).__name__}); only Sequential and functional "
              "models of stock layers can be converted", 4)
    model.save(target, save_format="h5")
    layers = [type(layer).__name__ for layer in model.layers]
    print(json.dumps({"layers": layers, "stripped_tfmot_wrappers": stripped}))


def write(config, weights, target, save_format):
    tf_keras = _import_tf_keras()
    import numpy as np

    with open(config) as file:
        model = tf_keras.models.model_from_json(file.read())
    with np.load(weights) as arrays:
        model.set_weights([arrays[f"arr_{index}"] for index in range(len(arrays.files))])
    model.save(target, save_format=save_format)
    print(json.dumps({"params": int(model.count_params())}))


def predict(source, inputs, target):
    tf_keras = _import_tf_keras()
    import numpy as np

    model = tf_keras.models.load_model(source, compile=False)
    np.save(target, np.asarray(model.predict(np.load(inputs), batch_size=256, verbose=0)))
    print(json.dumps({"rows": int(np.load(target).shape[0])}))


COMMANDS = {"read": read, "write": write, "predict": predict}

if __name__ == "__main__":
    stdout = os.dup(1)
    os.dup2(2, 1)  # what TensorFlow prints goes to stderr: stdout carries only the JSON
    sys.stdout = os.fdopen(stdout, "w")
    command, *arguments = sys.argv[1:]
    if UNSAFE not in arguments:
        _import_tf_keras()
        forbid_code()
    try:
        COMMANDS[command](*[argument for argument in arguments if argument != UNSAFE])
    finally:
        if REFUSED:  # also when tf_keras swallowed the refusal
            _fail(REFUSED[0], 6)

"""The tf_keras side of `tf_keras_bridge`, run as its own process.

Importing tf_keras or tensorflow-model-optimization switches a process to legacy Keras
(TF_USE_LEGACY_KERAS), so keras-embed never imports them: it starts this script, which
imports nothing from keras_embed. Commands:

    read SRC DST.h5       load a tf_keras .h5 file or SavedModel folder (stripping tfmot's
                          pruning wrappers when tfmot is installed), save it as .h5
    write CONFIG WEIGHTS DST h5|tf
                          build a model from a tf_keras JSON config and an .npz of weights
                          (arr_0, arr_1, ... in get_weights order), save it
    predict MODEL X.npy OUT.npy
                          load a tf_keras model and write its outputs on X

Exit codes: 0 ok, 2 unreadable input, 4 unsupported model, 5 tf_keras not installed; the
reason is the last line of stderr. stdout carries one JSON object (read: what was done).

Example:
    python keras_embed/tf_keras_child.py read legacy_model/ /tmp/model.h5
"""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _fail(message, code):
    sys.stderr.write(message.replace("\n", " ") + "\n")
    sys.exit(code)


def _import_tf_keras():
    try:
        import tf_keras
    except ImportError:
        _fail("tf_keras is not installed", 5)
    return tf_keras


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
    COMMANDS[sys.argv[1]](*sys.argv[2:])

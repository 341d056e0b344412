"""tf_keras (Keras 2) models in and out, through a child process.

tf_keras and tensorflow-model-optimization switch the process that imports them to legacy
Keras, so they only ever run in `tf_keras_child.py`, started here:

- reading: a model whose config holds code is refused first (`tf_keras_code`), unless
  `unsafe`; then the child loads the tf_keras .h5 file or SavedModel folder (one with
  keras_metadata.pb), refusing code once more, strips tfmot's pruning wrappers if any,
  and saves it as a tf_keras .h5 file, which Keras 3 reads with its legacy loader (in
  safe mode);
- writing (`--keep-format`): the Keras 3 config is rewritten in tf_keras's dialect
  (`tf_keras_config`) and the child builds and saves the model with tf_keras;
- checking: the child loads what was written and computes its outputs.

Example:
    >>> model, notes = read_tf_keras("legacy_savedmodel/")
    >>> write_tf_keras(model, "out.h5", "h5")
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.files.tf_keras_code import code_refused, refuse_code

CHILD = Path(__file__).with_name("tf_keras_child.py")
TIMEOUT = 600  # seconds one child may take (imports included)
EXTRA = "pip install 'keras-embed[tf_keras]'"
_DROPPED_KEYS = {"quantization_config", "lora_rank", "lora_alpha", "optional", "synchronized"}
_POLICIES = ("DTypePolicy", "FloatDTypePolicy")


def tf_keras_installed():
    """Whether tf_keras can be imported (asked of a child: never imported here)."""
    done = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('tf_keras') is not None)"],
                          capture_output=True, text=True)
    return done.stdout.strip() == "True"


def _run(command, model, *args):
    """Runs one child command on `model` (the file it loads, named in messages); returns its
    JSON answer or raises the mapped error."""
    try:
        done = subprocess.run([sys.executable, str(CHILD), command, *map(str, (model, *args))],
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InputError(f"tf_keras did not finish '{command}' in {TIMEOUT} s") from None
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
    if done.returncode == 5:
        raise InputError(f"this model needs tf_keras, which is not installed: {EXTRA}")
    if done.returncode == 4:
        raise UnsupportedLayerError(reason)
    if done.returncode == 6:
        raise code_refused(model, reason)
    raise InputError(reason)


def read_tf_keras(path, unsafe=False):
    """Loads a tf_keras .h5 file or SavedModel folder as a Keras 3 model.

    Args:
        path: the model.
        unsafe: let tf_keras deserialise code the model holds (Lambda layers and the
            like, see `tf_keras_code`): only for files you trust.

    Returns:
        (Keras 3 model, dict of notes: the tf_keras layer classes, whether tfmot's pruning
        wrappers were stripped).

    Raises:
        InputError: the model holds code (and not `unsafe`), or tf_keras cannot read it.
        UnsupportedLayerError: a subclassed model, or layers Keras 3 does not know.
    """
    from keras_embed.files.load import load_model

    refuse_code(path, unsafe)
    with tempfile.TemporaryDirectory(prefix="keras-embed-") as folder:
        converted = Path(folder) / "model.h5"
        notes = _run("read", path, converted, *(["--unsafe"] if unsafe else []))
        try:
            model = load_model(converted, unsafe)
        except (InputError, UnsupportedLayerError) as error:  # its message names the converted copy
            raise type(error)(str(error).replace(str(converted), str(path))) from None
    return model, notes


def _keras2_tensors(node):
    """tf_keras inbound-node entries [layer, node, tensor, {}] of a Keras 3 call's arguments."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            return [[*node["config"]["keras_history"], {}]]
        return [entry for value in node.values() for entry in _keras2_tensors(value)]
    if isinstance(node, list):
        return [entry for value in node for entry in _keras2_tensors(value)]
    return []


def _keras2(node):
    if isinstance(node, list):
        return [_keras2(value) for value in node]
    if not isinstance(node, dict):
        return node
    if node.get("class_name") in _POLICIES:
        return node["config"]["name"]
    if "inbound_nodes" in node:
        node = dict(node, inbound_nodes=[_keras2_tensors(call["args"]) for call in node["inbound_nodes"]])
    node = {key: _keras2(value) for key, value in node.items()
            if key not in _DROPPED_KEYS and not key.endswith("_initializer")}
    if "batch_shape" in node:
        node["batch_input_shape"] = node.pop("batch_shape")
    return node


def tf_keras_config(model):
    """The JSON config of a Keras 3 model of stock layers in tf_keras's dialect.

    Dtype policies become their names, `batch_shape` becomes `batch_input_shape`, call
    arguments become tf_keras inbound-node lists; initializers and options tf_keras does
    not know are dropped (the weights are set afterwards).

    Example:
        >>> json.loads(tf_keras_config(model))["config"]["layers"][0]["config"]["batch_input_shape"]
        [None, 64]
    """
    return json.dumps(_keras2(json.loads(model.to_json())))


def write_tf_keras(model, path, format):
    """Writes `model` with tf_keras: format 'h5' (a file) or 'savedmodel' (a folder)."""
    with tempfile.TemporaryDirectory(prefix="keras-embed-") as folder:
        config, weights = Path(folder) / "config.json", Path(folder) / "weights.npz"
        config.write_text(tf_keras_config(model))
        np.savez(weights, *model.get_weights())
        _run("write", config, weights, path, "h5" if format == "h5" else "tf")


def predict_tf_keras(path, x):
    """Outputs of the tf_keras model at `path` on `x`, computed by tf_keras."""
    with tempfile.TemporaryDirectory(prefix="keras-embed-") as folder:
        inputs, outputs = Path(folder) / "x.npy", Path(folder) / "y.npy"
        np.save(inputs, x)
        _run("predict", path, inputs, outputs)
        return np.load(outputs)

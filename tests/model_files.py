"""Model files the tests build without importing tf_keras, hostile ones included.

- `build_tf_keras_models` runs `TF_KERAS_BUILD` in a child process (importing tf_keras or
  tensorflow-model-optimization here would switch the test process to legacy Keras).
- `data_from_outside` edits an .h5 model so that a weight's data comes from another file
  (`OUTSIDE` names the ways).
"""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

# Builds the tf_keras models in WORKDIR; prints the zero rows tfmot left in the pruned kernel.
# The payload_* models hold a Lambda layer that creates WORKDIR/payload-ran when it runs
# (it runs here once, while the model is built; the file is removed at the end), their
# class name respelled as a JSON escape ("\u004cambda": the same JSON) in the .h5 config
# or in every node of keras_metadata.pb.
TF_KERAS_BUILD = r"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import h5py, numpy as np, tensorflow as tf, tf_keras as K
from tf_keras.protobuf import saved_metadata_pb2
work = sys.argv[1]
rng = np.random.default_rng(0)
def chain():
    inputs = K.Input((6,), name="features")
    hidden = K.layers.Dense(8, activation="relu", name="hidden")(inputs)
    hidden = K.layers.BatchNormalization(name="norm")(hidden)
    model = K.Model(inputs, K.layers.Dense(3, name="scores")(hidden))
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    kernel, bias = model.get_layer("scores").get_weights()
    kernel[:3] = 0  # three null units: no outgoing weights
    model.get_layer("scores").set_weights([kernel, bias])
    variance = model.get_layer("norm").get_weights()
    variance[3] = np.abs(variance[3]) + 0.5
    model.get_layer("norm").set_weights(variance)
    return model
model = chain()
model.save(f"{work}/legacy.h5")
model.save(f"{work}/legacy_savedmodel", save_format="tf")
K.Sequential([K.Input((2,)), K.layers.Lambda(lambda x: x * 2)]).save(f"{work}/lambda.h5")

payload = f"{work}/payload-ran"
def writer(path):
    return lambda x: (open(path, "w").close(), x)[1]
def escaped(text):
    return text.replace('"Lambda"', '"\\u004cambda"')
def save_escaped_h5(model, name):
    model.save(f"{work}/{name}")
    with h5py.File(f"{work}/{name}", "r+") as file:
        file.attrs["model_config"] = escaped(file.attrs["model_config"])
def save_escaped_savedmodel(model, name):
    model.save(f"{work}/{name}", save_format="tf")
    path = f"{work}/{name}/keras_metadata.pb"
    with open(path, "rb") as file:
        metadata = saved_metadata_pb2.SavedMetadata.FromString(file.read())
    for node in metadata.nodes:
        node.metadata = escaped(node.metadata)
    with open(path, "wb") as file:
        file.write(metadata.SerializeToString())
flat = K.Sequential([K.Input((2,)), K.layers.Dense(3), K.layers.Lambda(writer(payload))])
save_escaped_h5(flat, "payload_escaped.h5")
save_escaped_savedmodel(flat, "payload_escaped_savedmodel")
inputs = K.Input((2,))
inner = K.Sequential([K.Input((2,)), K.layers.Dense(3), K.layers.Lambda(writer(payload))], name="inner")
save_escaped_h5(K.Model(inputs, K.layers.Dense(1)(inner(inputs))), "payload_nested.h5")
sequence = K.Input((4, 2))
wrapper = K.layers.TimeDistributed(K.layers.Lambda(writer(payload)))
save_escaped_h5(K.Model(sequence, K.layers.Dense(1)(wrapper(sequence))), "payload_wrapped.h5")
save_escaped_h5(K.Sequential([K.Input((2,)), K.layers.Lambda(lambda x: x * 2)]), "lambda_escaped.h5")
save_escaped_savedmodel(K.Sequential([K.Input((2,)), K.layers.Lambda(lambda x: x * 2)]), "lambda_escaped_savedmodel")
features = K.Input((2,))
K.Model(features, K.layers.Dense(1)(tf.math.multiply(features, 2.0))).save(f"{work}/tf_op.h5")
os.remove(payload)

import tensorflow_model_optimization as tfmot
schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, end_step=1, frequency=1)
wrapped = K.Sequential([K.Input((6,)), K.layers.Dense(8, activation="tanh"),
    tfmot.sparsity.keras.prune_low_magnitude(K.layers.Dense(3), pruning_schedule=schedule)])
kernel = rng.normal(size=(8, 3)).astype("float32")
kernel[:4] = np.sign(kernel[:4]) * 1e-3  # the 12 smallest magnitudes (50%) fill four whole rows
kernel[4:] = np.sign(kernel[4:]) * (1 + np.abs(kernel[4:]))
wrapped.layers[-1].layer.kernel.assign(kernel)
x = rng.normal(size=(32, 6)).astype("float32")
wrapped.compile(K.optimizers.SGD(0.0), "mse")
wrapped.fit(x, np.zeros((32, 3), "float32"), epochs=1, batch_size=32, verbose=0,
            callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
stripped.save(f"{work}/tfmot.h5")
kernel = stripped.layers[-1].get_weights()[0]
print(json.dumps({"zero_rows": int((np.abs(kernel).sum(axis=1) == 0).sum()), "zeros": int((kernel == 0).sum())}))
"""
SECRET = b"TOP-SECRET-BYTES"  # what the files `data_from_outside` points at hold
OUTSIDE = ("external", "virtual", "link")  # the ways `data_from_outside` knows
PAYLOAD = "payload-ran"  # the file the payload_* models create when their code runs
PAYLOAD_MODELS = ("payload_escaped.h5", "payload_escaped_savedmodel", "payload_nested.h5", "payload_wrapped.h5")


def build_tf_keras_models(folder):
    """Builds the `TF_KERAS_BUILD` models in `folder`; returns what it says of the tfmot
    model. Skips the test when tf_keras or tensorflow-model-optimization is missing."""
    done = subprocess.run([sys.executable, "-c", TF_KERAS_BUILD, str(folder)], capture_output=True, text=True,
                          timeout=600)
    for module, extra in (("tf_keras", "tf_keras"), ("tensorflow_model_optimization", "bench")):
        if f"No module named '{module}'" in done.stderr:
            pytest.skip(f"{module} is not installed (the {extra} extra)")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_kernel(file):
    """The name of the first dataset of an open .h5 file whose name holds 'kernel'."""
    names = []
    file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return next(name for name in names if "kernel" in name)


def data_from_outside(path, how, folder):
    """Replaces the first kernel of the .h5 model at `path` by one whose data lives in a
    file written into `folder`, holding `SECRET` over and over: 'external' storage (a raw
    file), a 'virtual' dataset or an external 'link' (both to the dataset 'data' of an HDF5
    file). Returns the kernel's name."""
    with h5py.File(path, "r+") as file:
        name = first_kernel(file)
        shape, dtype = file[name].shape, file[name].dtype
        size = int(np.prod(shape)) * dtype.itemsize
        secret = (SECRET * (size // len(SECRET) + 1))[:size]
        (folder / "secret.bin").write_bytes(secret)
        with h5py.File(folder / "secret.h5", "w") as source:
            source["data"] = np.frombuffer(secret, dtype).reshape(shape)
        del file[name]
        if how == "external":
            file.create_dataset(name, shape=shape, dtype=dtype, external=[(str(folder / "secret.bin"), 0, size)])
        elif how == "virtual":
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(str(folder / "secret.h5"), "data", shape=shape)
            file.create_virtual_dataset(name, layout)
        else:
            file[name] = h5py.ExternalLink(str(folder / "secret.h5"), "data")
    return name

"""SavedModels that do something besides computing when TensorFlow loads or serves them.

Each builder `build(folder, file)` writes a plain SavedModel at `folder` that computes
`x @ kernel` from an input of shape (None, 3) and also, when TensorFlow runs the part
named, writes `file` (a payload) or reads `file` (a local secret the builder creates) into
its weights. keras-embed must refuse them all without running anything: a payload never
exists, and nothing is written. `BUILDERS` maps a name to each and the op it holds.
"""

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1
KERNEL = np.arange(6, dtype="float32").reshape(3, 2)
PAYLOAD_TEXT = b"written by the SavedModel"


def tf1(folder, extras):
    """A TF1 SavedModel (SavedModelBuilder): `extras(x, y)` returns (y, more builder options)."""
    with tf.Graph().as_default(), v1.Session() as session:
        x = v1.placeholder(tf.float32, (None, 3), name="x")
        y = tf.matmul(x, v1.get_variable("kernel", initializer=KERNEL))
        y, more = extras(x, y)
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(folder))
        signature = v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature},
                                             **more)
        builder.save()


def main_op_writes(folder, payload):
    tf1(folder, lambda x, y: (y, {"main_op": tf.io.write_file(str(payload), PAYLOAD_TEXT)}))


def legacy_init_op_writes(folder, payload):
    tf1(folder, lambda x, y: (y, {"legacy_init_op": tf.group(tf.io.write_file(str(payload), PAYLOAD_TEXT))}))


def asset_initializer_writes(folder, payload):
    """The TF1 loader feeds the asset's path to the init op, which copies the asset to `payload`."""
    asset_file = folder.parent / f"{folder.name}-vocabulary.txt"
    asset_file.write_bytes(PAYLOAD_TEXT)

    def extras(x, y):
        asset = tf.constant(str(asset_file), name="vocabulary_path")
        v1.add_to_collection(v1.GraphKeys.ASSET_FILEPATHS, asset)
        copy = tf.io.write_file(str(payload), tf.io.read_file(asset))
        return y, {"assets_collection": v1.get_collection(v1.GraphKeys.ASSET_FILEPATHS), "main_op": copy}

    tf1(folder, extras)


def _write_payload(payload):
    def write():
        payload.write_bytes(PAYLOAD_TEXT)
        return np.zeros(2, "float32")

    return write


def py_func_in_graph(folder, payload):
    """A bias computed by Python (PyFunc): in the process that saved it, running it writes `payload`."""

    def extras(x, y):
        bias = v1.py_func(_write_payload(payload), [], tf.float32)
        bias.set_shape((2,))
        return y + bias, {}

    tf1(folder, extras)


class _Served(tf.Module):
    """A TF2 module whose serving function is `x @ kernel` with `extra()` woven in."""

    def __init__(self, extra):
        super().__init__()
        self.kernel = tf.Variable(KERNEL)
        self.extra = extra

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def serve(self, x):
        return self.extra(x, self.kernel)


def tf2(folder, extra, **more_functions):
    module = _Served(extra)
    for name, function in more_functions.items():
        setattr(module, name, function)
    tf.saved_model.save(module, str(folder), signatures=module.serve)


def serving_function_writes(folder, payload):
    """The kernel is read after a write_file: every call of the serving function writes `payload`."""

    def extra(x, kernel):
        with tf.control_dependencies([tf.io.write_file(str(payload), PAYLOAD_TEXT)]):
            return tf.matmul(x, tf.identity(kernel))

    tf2(folder, extra)


def other_function_writes(folder, payload):
    """The serving function is clean; another saved function writes `payload` when called."""

    @tf.function(input_signature=[])
    def writer():
        tf.io.write_file(str(payload), PAYLOAD_TEXT)

    tf2(folder, lambda x, kernel: tf.matmul(x, kernel), write=writer)


def eager_py_func_in_serving_function(folder, payload):
    def extra(x, kernel):
        bias = tf.py_function(_write_payload(payload), [], tf.float32)
        return tf.matmul(x, kernel) + tf.reshape(bias, (2,))

    tf2(folder, extra)


def secret_read_into_kernel(folder, secret):
    """The kernel is the bytes of the local file `secret` (24 bytes: six float32)."""
    secret.write_bytes(np.full(6, 7.0, "float32").tobytes())

    def extra(x, kernel):
        stolen = tf.reshape(tf.io.decode_raw(tf.io.read_file(str(secret)), tf.float32), (3, 2))
        return tf.matmul(x, kernel + stolen)

    tf2(folder, extra)


def checkpoint_restored_into_kernel(folder, secret):
    """The kernel comes from another checkpoint on disk, by RestoreV2 in the serving function."""
    checkpoint = tf.train.Checkpoint(value=tf.Variable(np.full((3, 2), 7.0, "float32")))
    prefix = checkpoint.write(str(secret))

    def extra(x, kernel):
        (stolen,) = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=["value/.ATTRIBUTES/VARIABLE_VALUE"],
                                         shape_and_slices=[""], dtypes=[tf.float32])
        return tf.matmul(x, kernel + tf.reshape(stolen, (3, 2)))

    tf2(folder, extra)


def dataset_reads_into_kernel(folder, secret):
    """The kernel is the first line of the local file `secret`, read by a tf.data pipeline."""
    secret.write_bytes(b"7\n")

    def extra(x, kernel):
        line = tf.data.TextLineDataset(str(secret)).reduce(tf.constant(""), lambda first, line: line)
        return tf.matmul(x, kernel + tf.strings.to_number(line))

    tf2(folder, extra)


def serving_function_prints(folder, payload):
    def extra(x, kernel):
        tf.print("served", output_stream=f"file://{payload}")
        return tf.matmul(x, kernel)

    tf2(folder, extra)


# name -> (builder, the op the refusal names)
BUILDERS = {
    "tf1-main-op-writes": (main_op_writes, "WriteFile"),
    "tf1-legacy-init-op-writes": (legacy_init_op_writes, "WriteFile"),
    "tf1-asset-initializer-writes": (asset_initializer_writes, "WriteFile"),
    "tf1-py-func": (py_func_in_graph, "PyFunc"),
    "tf2-serving-function-writes": (serving_function_writes, "WriteFile"),
    "tf2-other-function-writes": (other_function_writes, "WriteFile"),
    "tf2-eager-py-func": (eager_py_func_in_serving_function, "EagerPyFunc"),
    "tf2-secret-read-into-kernel": (secret_read_into_kernel, "ReadFile"),
    "tf2-checkpoint-restored-into-kernel": (checkpoint_restored_into_kernel, "RestoreV2"),
    "tf2-dataset-reads-into-kernel": (dataset_reads_into_kernel, "TextLineDataset"),
    "tf2-print-to-file": (serving_function_prints, "PrintV2"),
}

"""The values of a plain SavedModel's variables, read from its checkpoint without running a graph.

TF1 SavedModels (`SavedModelBuilder`) store each variable under the name of its variable
op. TF2 ones (`tf.saved_model.save`, Keras `model.export`) bind the trailing (captured)
inputs of each saved function to objects of the `SavedObjectGraph`
(`concrete_functions[name].bound_inputs`, as `tf.saved_model.load` binds captures), and
the checkpoint's own object graph (its `_CHECKPOINTABLE_OBJECT_GRAPH` entry), matched to
it from the root by child names as TensorFlow's checkpoint restore does, holds each
variable's `checkpoint_key`. Values come from TensorFlow's checkpoint reader, which reads
the tensor bundle (`variables/variables.index` and `.data-*`) and nothing else.

Example:
    >>> checkpoint = Checkpoint("exported/")                   # a Keras export of Dense(6) on 5 inputs
    >>> keys = variable_keys(meta_graph, checkpoint, "exported/")  # meta_graph: from saved_model.pb
    >>> keys["sequential/dense/kernel_1"]
    'variables/0/.ATTRIBUTES/VARIABLE_VALUE'
    >>> checkpoint.value(keys["sequential/dense/kernel_1"], dtype=1).shape  # 1: DT_FLOAT
    (5, 6)
"""

from pathlib import Path

import numpy as np

from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.files.savedmodel_check import CALL_OPS, node_name

VARIABLE_SOURCES = ("VarHandleOp", "VariableV2", "Variable")
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_ATTRIBUTE = "VARIABLE_VALUE"


def unreadable(path, why):
    return UnsupportedLayerError(f"'{path}' is a SavedModel keras-embed cannot read ({why}); "
                                 "pass the .keras or .h5 file it came from")


class Checkpoint:
    """The values in a SavedModel's `variables/` checkpoint, read without running a graph."""

    def __init__(self, path):
        import tensorflow as tf

        self.path, prefix = path, Path(path) / "variables" / "variables"
        self.reader = None
        if Path(f"{prefix}.index").is_file():
            # by prefix: tf.train.load_checkpoint would follow a 'checkpoint' file of a folder of that name
            self.reader = self._reading(lambda: tf.compat.v1.train.NewCheckpointReader(str(prefix)))
        self.data_bytes = sum(file.stat().st_size for file in prefix.parent.glob("variables.data-*"))
        self.shapes = self.reader.get_variable_to_shape_map() if self.reader else {}
        self.dtypes = self.reader.get_variable_to_dtype_map() if self.reader else {}

    def _reading(self, read):
        """`read()`, with the bundle reader's errors (and parse errors) as one InputError."""
        import tensorflow as tf
        from google.protobuf.message import DecodeError

        try:
            return read()
        except (tf.errors.OpError, DecodeError, ValueError, IndexError, RuntimeError) as error:  # C++ status types
            raise self._damaged(str(error).strip().splitlines()[0][:120] if str(error).strip() else
                                type(error).__name__) from None

    def _damaged(self, why):
        return InputError(f"the variables of SavedModel '{self.path}' are truncated or corrupt ({why}); re-export it")

    def value(self, key, dtype):
        """The entry `key` as a NumPy array of TensorFlow type enum `dtype`."""
        if key not in self.shapes:
            raise unreadable(self.path, f"its graph reads the variable '{key}', which its checkpoint does not hold")
        if self.dtypes[key].as_datatype_enum != dtype:
            raise unreadable(self.path, f"the variable '{key}' is stored as {self.dtypes[key].name} but read as "
                                        "another type")
        declared = int(np.prod(self.shapes[key])) * self.dtypes[key].size
        if declared > self.data_bytes:  # refused before the reader allocates it
            raise self._damaged(f"'{key}' declares {declared} bytes, its files hold {self.data_bytes}")
        return self._reading(lambda: self.reader.get_tensor(key))

    def object_graph(self):
        """The checkpoint's TrackableObjectGraph (TF2 checkpoints), or None."""
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        if _OBJECT_GRAPH_KEY not in self.shapes:
            return None
        return self._reading(lambda: trackable_object_graph_pb2.TrackableObjectGraph.FromString(
            self.reader.get_tensor(_OBJECT_GRAPH_KEY)))


def _checkpoint_keys(saved_objects, checkpoint_objects):
    """{SavedObjectGraph node id: checkpoint key} of every variable, the two object graphs
    matched from their roots by child names (as `tf.saved_model.load` restores them)."""
    matched, pending = {}, [(0, 0)] if saved_objects.nodes and checkpoint_objects.nodes else []
    while pending:
        saved, stored = pending.pop()
        if saved in matched or saved >= len(saved_objects.nodes) or stored >= len(checkpoint_objects.nodes):
            continue
        matched[saved] = stored
        children = {child.local_name: child.node_id for child in checkpoint_objects.nodes[stored].children}
        pending += [(child.node_id, children[child.local_name]) for child in saved_objects.nodes[saved].children
                    if child.local_name in children]
    return {saved: attribute.checkpoint_key for saved, stored in matched.items()
            for attribute in checkpoint_objects.nodes[stored].attributes if attribute.name == _VALUE_ATTRIBUTE}


def variable_keys(meta_graph, checkpoint, path):
    """{graph node name: checkpoint key} of the meta graph's variable ops.

    TF1: every variable op, by its name. TF2: the variable handles a call in the graph
    passes as the captured (trailing) inputs of a saved function, by `bound_inputs`.
    """
    nodes, saved_objects = meta_graph.graph_def.node, meta_graph.object_graph_def
    if not saved_objects.nodes:
        return {node.name: node.name for node in nodes if node.op in VARIABLE_SOURCES}
    stored = checkpoint.object_graph()
    keys = _checkpoint_keys(saved_objects, stored) if stored is not None else {}
    variables = {}
    for node in nodes:
        function = saved_objects.concrete_functions.get(node.attr["f"].func.name) if node.op in CALL_OPS else None
        if function is None or not function.bound_inputs:
            continue
        captured = [tensor for tensor in node.input if not tensor.startswith("^")][-len(function.bound_inputs):]
        if len(captured) != len(function.bound_inputs):
            raise unreadable(path, f"'{node.name}' passes fewer inputs than its function captures")
        for tensor, object_id in zip(captured, function.bound_inputs):
            if object_id < len(saved_objects.nodes) and saved_objects.nodes[object_id].WhichOneof("kind") == "variable":
                if object_id not in keys or variables.setdefault(node_name(tensor), keys[object_id]) != keys[object_id]:
                    raise unreadable(path, f"the variable '{node_name(tensor)}' has no single checkpoint entry")
    return variables

"""Plain SavedModels read without running them: the serving signature as one graph of constants.

Nothing from the folder runs while it is read:
1. `saved_model.pb` (or `.pbtxt`) is parsed by TensorFlow's protobuf parser
   (`loader_impl.parse_saved_model`, which only parses);
2. every graph and function in it is checked by `savedmodel_check` (an allow-list of ops
   and no init op that does anything) before anything else is looked at;
3. the variables' values are read by TensorFlow's checkpoint reader, which reads tensors
   from the `variables/` files (regular files only, no links) and runs no graph;
4. the serving signature's function is inlined, with every function it calls, into one
   GraphDef whose variable reads are `Const` nodes, and only what the output needs of it
   is kept (control edges are dropped: with the variables constant, they order nothing;
   a serving graph that changes variables is refused).

Which checkpoint entry each variable is: `savedmodel_variables`.

Example:
    >>> serving = read_serving_graph("exported/")   # from keras_model.export("exported/")
    >>> serving.input.shape, serving.output.shape
    (TensorShape([None, 5]), TensorShape([None, 3]))
"""

import dataclasses
from pathlib import Path

from keras_embed.errors import InputError, KerasEmbedError, UnsupportedLayerError
from keras_embed.files.savedmodel_check import (CALL_OPS, VARIABLE_WRITES, called_functions, closure, function_calls,
                                          inputs_of, library_of, node_name, refuse_unsafe_ops)
from keras_embed.files.savedmodel_variables import VARIABLE_SOURCES, Checkpoint, unreadable, variable_keys

SERVING_TAG = "serve"
SERVING_SIGNATURE = "serving_default"


@dataclasses.dataclass(frozen=True)
class ServingGraph:
    """The serving signature of a SavedModel as a `tf.Graph` of constants and pure ops."""

    graph: object  # tf.Graph
    input: object  # tf.Tensor, the signature's one input (a Placeholder)
    output: object  # tf.Tensor, the signature's one output


@dataclasses.dataclass(frozen=True)
class _Variable:
    """A resource handle standing for the checkpoint entry `key` while a graph is inlined."""

    key: str


def _refuse_links(path):
    """Every file the reader opens is a regular file of the folder: a symbolic link (or a
    device) named `variables.data-...` would make the bytes of any file weights."""
    folder = Path(path)
    expected = {folder / "saved_model.pb": Path.is_file, folder / "saved_model.pbtxt": Path.is_file,
                folder / "variables": Path.is_dir}
    entries = [(entry, kind) for entry, kind in expected.items() if entry.is_symlink() or entry.exists()]
    variables = folder / "variables"
    if variables.is_dir() and not variables.is_symlink():
        entries += [(entry, Path.is_file) for entry in sorted(variables.iterdir())]
    odd = [str(entry.relative_to(folder)) for entry, kind in entries if entry.is_symlink() or not kind(entry)]
    if odd:
        raise InputError(f"SavedModel '{path}' holds links or special files where its graph and variables should be "
                         f"({', '.join(odd)}); keras-embed reads regular files only: copy the real files in")


def _parse(path):
    from tensorflow.python.saved_model import loader_impl

    try:
        return loader_impl.parse_saved_model(str(path))
    except (OSError, ValueError) as error:  # parse errors come as IOError, a .pbtxt that is not UTF-8 as ValueError
        raise unreadable(path, str(error).strip().splitlines()[0][:160]) from None


def _serving_meta_graph(saved_model, path):
    """The meta graph tagged 'serve', or the only one."""
    graphs = list(saved_model.meta_graphs)
    tagged = [graph for graph in graphs if SERVING_TAG in graph.meta_info_def.tags]
    if len(tagged) == 1 or len(graphs) == 1:
        return (tagged or graphs)[0]
    raise unreadable(path, f"{len(graphs)} meta graphs, {len(tagged)} of them tagged '{SERVING_TAG}'")


def _signature(meta_graph, path):
    """The serving signature: 'serving_default', or the only one that is not an init op."""
    signatures = {key: value for key, value in meta_graph.signature_def.items() if not key.startswith("__saved_model")}
    signature = signatures.get(SERVING_SIGNATURE) or (next(iter(signatures.values())) if len(signatures) == 1 else None)
    if signature is None:
        raise UnsupportedLayerError(f"SavedModel '{path}' has no {SERVING_SIGNATURE} signature; "
                                    f"it has {', '.join(signatures) or 'none'}")
    if len(signature.inputs) != 1 or len(signature.outputs) != 1:
        raise UnsupportedLayerError(f"SavedModel '{path}' has {len(signature.inputs)} inputs and "
                                    f"{len(signature.outputs)} outputs; only single-input, single-output models "
                                    "are supported")
    (source,), (output,) = signature.inputs.values(), signature.outputs.values()
    if not source.name or not output.name:
        raise UnsupportedLayerError(f"SavedModel '{path}' takes or returns a sparse or composite tensor; "
                                    "only dense tensors are supported")
    return source.name, output.name


def _output_offsets(node, library):
    """{output argument name: index of its first tensor} of a node (function-body naming)."""
    from tensorflow.python.framework import op_def_registry

    op_def = library[node.op].signature if node.op in library else op_def_registry.get(node.op)
    if op_def is None:
        raise KeyError(f"op {node.op} is not registered")
    offsets, offset = {}, 0
    for argument in op_def.output_arg:
        offsets[argument.name] = offset
        if argument.number_attr:
            offset += node.attr[argument.number_attr].i
        elif argument.type_list_attr:
            offset += len(node.attr[argument.type_list_attr].list.type)
        else:
            offset += 1
    return offsets


def _topological(nodes, roots, path):
    """Names of `nodes` the `roots` need through data inputs, each after its inputs."""
    order, state, stack = [], {}, [(root, False) for root in reversed(roots) if root in nodes]
    while stack:
        name, expanded = stack.pop()
        if expanded:
            state[name] = "done"
            order.append(name)
            continue
        if state.get(name) == "done":
            continue
        if state.get(name) == "open":
            raise UnsupportedLayerError(f"SavedModel '{path}' has a loop in its serving graph (TF1 control flow), "
                                        "which keras-embed cannot rebuild as Keras layers")
        state[name] = "open"
        stack.append((name, True))
        inputs = [node_name(tensor) for tensor in reversed(nodes[name].input) if not tensor.startswith("^")]
        stack += [(tensor, False) for tensor in inputs if tensor in nodes and state.get(tensor) != "done"]
    return order


class _Inliner:
    """Builds one GraphDef from the meta graph's nodes and the functions they call.

    A scope is the meta graph or one call of a function; `done` maps each emitted node of
    a scope to the name of its copy (its outputs are 'copy:i') or to the list of what its
    outputs became (a call's results, a constant, a `_Variable`).
    """

    def __init__(self, meta_graph, variables, checkpoint, path):
        from tensorflow.core.framework import graph_pb2

        self.library = library_of(meta_graph.graph_def)
        self.variables, self.checkpoint, self.path = variables, checkpoint, path
        self.graph_def = graph_pb2.GraphDef(versions=meta_graph.graph_def.versions)
        self.names, self.constants, self.calling = set(), {}, []

    def graph(self, meta_graph, tensors):
        """The inlined copies of graph tensors 'name:i' (in the meta graph's naming)."""
        nodes = {node.name: node for node in meta_graph.graph_def.node}
        self._refuse_writes(nodes, {node_name(tensor) for tensor in tensors} & set(nodes))

        def source(tensor):
            name, _, index = tensor.partition(":")
            return name, int(index or 0)

        done = self._scope(nodes, [node_name(tensor) for tensor in tensors], source, "", self.variables)
        return [self._ref(done, *source(tensor)) for tensor in tensors]

    def _call(self, name, arguments, prefix):
        """The results of calling library function `name` on `arguments` (refs)."""
        function = self.library.get(name)
        if function is None or name in self.calling or len(arguments) != len(function.signature.input_arg):
            raise unreadable(self.path, f"a call of function '{name}' that is missing, recursive or mis-wired")
        nodes = {node.name: node for node in function.node_def}
        bound = dict(zip((argument.name for argument in function.signature.input_arg), arguments))
        offsets = {}

        def source(tensor):
            if tensor in bound:
                return tensor, None
            name, output, index = tensor.split(":")
            if name not in offsets:
                offsets[name] = _output_offsets(nodes[name], self.library)
            return name, offsets[name][output] + int(index)

        self.calling.append(name)
        results = [function.ret[argument.name] for argument in function.signature.output_arg]
        done = self._scope(nodes, [node_name(tensor) for tensor in results], source, prefix, {}, bound)
        self.calling.pop()
        return [self._ref(done, *source(tensor), bound) for tensor in results]

    def _scope(self, nodes, roots, source, prefix, variables, bound=None):
        done = {}
        for name in _topological(nodes, roots, self.path):
            node = nodes[name]
            inputs = [self._ref(done, *source(tensor), bound) for tensor in node.input if not tensor.startswith("^")]
            done[name] = self._emit(node, inputs, prefix, variables)
        return done

    @staticmethod
    def _ref(done, name, index, bound=None):
        if index is None:  # a function argument
            return bound[name]
        emitted = done[name]
        return f"{emitted}:{index}" if isinstance(emitted, str) else emitted[index]

    def _emit(self, node, inputs, prefix, variables):
        """What `node` becomes: a call inlined, a variable or its value, else a copy."""
        if node.op in CALL_OPS or node.op in self.library:
            name = node.attr["f"].func.name if node.op in CALL_OPS else node.op
            return self._call(name, inputs, f"{prefix}{node.name}/")
        name = prefix + node.name
        if node.name in variables and node.op in VARIABLE_SOURCES:
            key = variables[node.name]
            return [_Variable(key) if node.op == "VarHandleOp" else self._constant(key, node.attr["dtype"].type, name)]
        if node.op == "ReadVariableOp" and isinstance(inputs[0], _Variable):
            return [self._constant(inputs[0].key, node.attr["dtype"].type, name)]
        if node.op == "Identity" and isinstance(inputs[0], _Variable):  # a handle passed on
            return inputs
        if node.op in VARIABLE_SOURCES:
            raise unreadable(self.path, f"its serving graph reads the variable op '{node.name}', which is not saved "
                                        "with it")
        if called_functions(node, self.library):
            raise UnsupportedLayerError(f"SavedModel '{self.path}' has control flow ({node.op}) in its serving "
                                        "graph, which keras-embed cannot rebuild as Keras layers")
        if any(isinstance(tensor, _Variable) for tensor in inputs):
            raise UnsupportedLayerError(f"SavedModel '{self.path}' uses a variable in its serving graph other than "
                                        f"by reading it ({node.op}); keras-embed cannot rebuild it as Keras layers")
        copy = self.graph_def.node.add(name=self._unique(name), op=node.op, input=inputs)
        for key, value in node.attr.items():
            if not key.startswith("_"):  # colocation, output shapes and other hints of the original graph
                copy.attr[key].CopyFrom(value)
        return copy.name

    def _constant(self, key, dtype, name):
        """A Const node holding checkpoint entry `key` (one per entry, named after its first reader)."""
        from tensorflow.python.framework import tensor_util

        if key not in self.constants:
            value = self.checkpoint.value(key, dtype)
            node = self.graph_def.node.add(name=self._unique(name), op="Const")
            node.attr["dtype"].type = dtype
            node.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(value))
            self.constants[key] = f"{node.name}:0"
        return self.constants[key]

    def _refuse_writes(self, nodes, roots):
        """Refuses outputs whose computation changes a variable: what `roots` reach by data or
        control edges and every op of the functions those call (a function runs them all),
        which inlining would drop while TensorFlow serves the changed value."""
        needed = closure(roots, inputs_of(nodes))
        functions = closure([called for name in needed for called in called_functions(nodes[name], self.library)],
                            function_calls(self.library))
        ops = [nodes[name].op for name in needed] + [node.op for name in functions
                                                     for node in self.library[name].node_def]
        writes = sorted(VARIABLE_WRITES.intersection(ops))
        if writes:
            raise UnsupportedLayerError(f"SavedModel '{self.path}' changes variables while it serves "
                                        f"({', '.join(writes)}); keras-embed reads them as the checkpoint's constants "
                                        "and cannot rebuild that as Keras layers")

    def _unique(self, name):
        candidate, number = name, 0
        while candidate in self.names:
            number += 1
            candidate = f"{name}_{number}"
        self.names.add(candidate)
        return candidate


def _refuse_state(graph_def, source, path):
    """The inlined graph computes from its input alone: no other Placeholder, no op with state."""
    from tensorflow.python.framework import op_def_registry

    placeholders = [node.name for node in graph_def.node if node.op == "Placeholder" and node.name != source]
    if placeholders:
        raise UnsupportedLayerError(f"SavedModel '{path}' needs values its signature does not take "
                                    f"({', '.join(placeholders)}); only single-input models are supported")
    stateful = {node.op for node in graph_def.node
                if op_def_registry.get(node.op) is None or op_def_registry.get(node.op).is_stateful}
    if stateful:
        raise UnsupportedLayerError(f"SavedModel '{path}' has ops with state in its serving graph "
                                    f"({', '.join(sorted(stateful))}); keras-embed cannot rebuild them as Keras layers")


def check_saved_model(path):
    """Parses a SavedModel folder and refuses it (as `read_serving_graph` does) when its files
    are links or special files, or its graphs hold ops outside `savedmodel_check`'s lists;
    returns the parsed `SavedModel`. Nothing from it runs.

    Example:
        >>> check_saved_model("legacy_savedmodel/")      # before tf_keras loads it in its child
    """
    _refuse_links(path)
    saved_model = _parse(path)
    refuse_unsafe_ops(saved_model, path)
    return saved_model


def read_serving_graph(path, batch=None):
    """Reads a plain SavedModel's serving signature as a graph, running nothing from it.

    Args:
        path: the SavedModel folder.
        batch: a batch size to give the input's shape (when its batch axis is open), so that
            TensorFlow's shape inference knows every static shape the input determines (a
            shape computed from `tf.shape` of a tensor, as a Dense on a 4-D tensor does).

    Returns:
        A `ServingGraph`: a `tf.Graph` of the signature's ops with every variable a
        constant, its input Placeholder and its output tensor.

    Raises:
        UnsupportedLayerError: an unreadable folder; ops outside `savedmodel_check`'s
            lists or an init op that does something (listed); several inputs or
            outputs; a serving graph with control flow, state or variables not saved.
        InputError: links or special files among the files read; a truncated or corrupt
            checkpoint (one declaring more bytes than its files hold is refused before
            anything is allocated).
    """
    saved_model = check_saved_model(path)
    meta_graph = _serving_meta_graph(saved_model, path)
    source, output = _signature(meta_graph, path)
    checkpoint = Checkpoint(path)
    inliner = _Inliner(meta_graph, variable_keys(meta_graph, checkpoint, path), checkpoint, path)
    try:
        source_ref, output_ref = inliner.graph(meta_graph, [source, output])
    except KerasEmbedError:
        raise
    except (KeyError, ValueError, IndexError, RecursionError) as error:  # names, arguments or calls that do not add up
        raise unreadable(path, f"its serving graph does not wire up: {type(error).__name__} {error}"[:200]) from None
    if not isinstance(source_ref, str) or not isinstance(output_ref, str):
        raise unreadable(path, "its signature's input or output is not a tensor of its graph")
    _refuse_state(inliner.graph_def, node_name(source_ref), path)
    if batch is not None:
        _fix_batch(inliner.graph_def, node_name(source_ref), batch)
    return _imported(inliner.graph_def, source_ref, output_ref, path)


def _fix_batch(graph_def, source, batch):
    """Gives the input Placeholder `source` batch size `batch` where its batch axis is open."""
    shape = next(node for node in graph_def.node if node.name == source).attr["shape"].shape
    if not shape.unknown_rank and shape.dim and shape.dim[0].size == -1:
        shape.dim[0].size = batch


def _imported(graph_def, source, output, path):
    """`graph_def` as a new `tf.Graph` (building it runs nothing) and its two tensors."""
    import tensorflow as tf

    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
        return ServingGraph(graph, graph.get_tensor_by_name(source), graph.get_tensor_by_name(output))
    except (ValueError, KeyError, tf.errors.OpError) as error:
        raise unreadable(path, f"its serving graph: {str(error).strip().splitlines()[0][:160]}") from None

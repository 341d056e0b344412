"""What a plain SavedModel may hold before keras-embed reads it, decided on its parsed graph.

TensorFlow runs parts of a SavedModel when it loads one: the restore function, the TF1
`main_op` or `legacy_init_op`, asset and table initializers. keras-embed runs none of them,
and refuses a SavedModel before reading further when any graph or function in it (not
only the serving path) holds an op outside these lists:

    PURE_OPS      math, array, neural-network, shape, random, gradient and control-flow
                  ops: they compute tensors from tensors and touch nothing else
    VARIABLE_OPS  variable handles, reads and assignments (optimizer updates included):
                  they change variables in memory, never a file
    SAVER_OPS     checkpoint file IO (SaveV2, RestoreV2, ...), allowed only in the saver
                  of the variables (`MetaGraphDef.saver_def`) and the functions only it calls

It also refuses an init op (TF1 `main_op`, `legacy_init_op`; TF2 `__saved_model_init_op`)
that would run anything but `NoOp`: keras-embed reads variables from the checkpoint and
runs no init op, so a model that needs one (a lookup table, an assignment after restore)
would be read wrongly. Both refusals are `UnsupportedLayerError`s (exit 4) listing the ops.

An allow-list, not a deny-list: TensorFlow registers well over a thousand ops and adds
more each release (custom op libraries add their own), and side effects are not marked
reliably (`ReadFile` and `MatchingFiles` are not "stateful", yet they read the disk), so
only ops known to touch nothing but tensors and variables pass.

Example:
    >>> refuse_unsafe_ops(loader_impl.parse_saved_model("exported/"), "exported/")
"""

from keras_embed.errors import UnsupportedLayerError

CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
PURE_OPS = frozenset({
    # structure and control flow
    "Const", "Identity", "IdentityN", "NoOp", "Placeholder", "PlaceholderWithDefault", "StopGradient",
    "PreventGradient", "Snapshot", "EnsureShape", "CheckNumerics", *CALL_OPS, "If", "StatelessIf", "While",
    "StatelessWhile", "Case", "StatelessCase", "Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond",
    "EmptyTensorList", "TensorListFromTensor", "TensorListGetItem", "TensorListSetItem", "TensorListReserve",
    "TensorListStack", "TensorListLength", "TensorListElementShape", "TensorListPushBack", "TensorListPopBack",
    # elementwise math
    "Abs", "Acos", "Acosh", "Add", "AddN", "AddV2", "Asin", "Asinh", "Atan", "Atan2", "Atanh", "BiasAdd", "Cast",
    "Ceil", "ClipByValue", "Cos", "Cosh", "Div", "DivNoNan", "Elu", "Equal", "Erf", "Erfc", "Exp", "Expm1", "Floor",
    "FloorDiv", "FloorMod", "Greater", "GreaterEqual", "IsFinite", "IsInf", "IsNan", "LeakyRelu", "Less",
    "LessEqual", "Log", "Log1p", "LogicalAnd", "LogicalNot", "LogicalOr", "Maximum", "Minimum", "Mod", "Mul",
    "MulNoNan", "Neg", "NotEqual", "Pow", "RealDiv", "Reciprocal", "Relu", "Relu6", "Rint", "Round", "Rsqrt",
    "Select", "SelectV2", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Square",
    "SquaredDifference", "Sub", "Tan", "Tanh", "TruncateDiv", "TruncateMod", "Xdivy", "Xlogy",
    # reductions, linear algebra, neural networks
    "All", "Any", "ArgMax", "ArgMin", "Cumprod", "Cumsum", "EuclideanNorm", "Max", "Mean", "Min", "Prod", "Sum",
    "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "MatMul", "MatrixBandPart", "AvgPool",
    "AvgPool3D", "Conv2D", "Conv2DBackpropInput", "Conv3D", "Conv3DBackpropInputV2", "DepthwiseConv2dNative",
    "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "LRN", "LogSoftmax", "MaxPool", "MaxPool3D",
    "MaxPoolV2", "ResizeBilinear", "ResizeNearestNeighbor", "Softmax", "TopKV2",
    # arrays and shapes
    "BatchToSpaceND", "BroadcastArgs", "BroadcastTo", "Concat", "ConcatV2", "DepthToSpace", "ExpandDims", "Fill",
    "Gather", "GatherNd", "GatherV2", "InvertPermutation", "LinSpace", "MirrorPad", "OneHot", "OnesLike", "Pack",
    "Pad", "PadV2", "Range", "Rank", "Reshape", "ReverseV2", "ScatterNd", "Shape", "ShapeN", "Size", "Slice",
    "SpaceToBatchND", "SpaceToDepth", "Split", "SplitV", "Squeeze", "StridedSlice", "TensorScatterUpdate", "Tile",
    "Transpose", "Unpack", "Where", "ZerosLike",
    # random numbers (they change nothing but a generator's state)
    "RandomStandardNormal", "RandomUniform", "RandomUniformInt", "TruncatedNormal", "StatelessRandomNormal",
    "StatelessRandomNormalV2", "StatelessRandomUniform", "StatelessRandomUniformInt", "StatelessRandomUniformIntV2",
    "StatelessRandomUniformV2", "StatelessTruncatedNormal", "StatelessTruncatedNormalV2",
    "StatelessRandomGetKeyCounter", "StatelessRandomGetKeyCounterAlg", "StatelessRandomGetAlg",
    # gradients (training graphs saved with the model)
    "AvgPoolGrad", "BiasAddGrad", "BroadcastGradientArgs", "Conv2DBackpropFilter",
    "DepthwiseConv2dNativeBackpropFilter", "DepthwiseConv2dNativeBackpropInput", "EluGrad", "FusedBatchNormGradV3",
    "L2Loss", "LeakyReluGrad", "MaxPoolGrad", "ReciprocalGrad", "Relu6Grad", "ReluGrad", "RsqrtGrad", "SeluGrad",
    "SigmoidGrad", "SoftmaxCrossEntropyWithLogits", "SoftplusGrad", "SoftsignGrad",
    "SparseSoftmaxCrossEntropyWithLogits", "SqrtGrad", "TanhGrad", "UnsortedSegmentSum",
})
VARIABLE_OPS = frozenset({
    "VarHandleOp", "ReadVariableOp", "VarIsInitializedOp", "DisableCopyOnRead", "DestroyResourceOp",
    "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "ResourceGather", "VariableV2", "Variable",
    "Assign", "AssignAdd", "AssignSub", "IsVariableInitialized", "ApplyAdam", "ApplyAdagrad", "ApplyGradientDescent",
    "ApplyMomentum", "ApplyRMSProp", "ResourceApplyAdam", "ResourceApplyAdagrad", "ResourceApplyAdagradV2",
    "ResourceApplyGradientDescent", "ResourceApplyKerasMomentum", "ResourceApplyMomentum", "ResourceApplyRMSProp",
})
VARIABLE_WRITES = VARIABLE_OPS - {"VarHandleOp", "ReadVariableOp", "VarIsInitializedOp", "DisableCopyOnRead",
                                  "ResourceGather", "VariableV2", "Variable", "IsVariableInitialized"}
SAVER_OPS = frozenset({"SaveV2", "Save", "SaveSlices", "RestoreV2", "Restore", "RestoreSlice", "MergeV2Checkpoints",
                       "ShardedFilename", "ShardedFilespec", "StringJoin", "StaticRegexFullMatch"})
INIT_OP_COLLECTIONS = ("saved_model_main_op", "legacy_init_op")  # TF1 SavedModelBuilder's main_op, legacy_init_op
INIT_OP_SIGNATURE = "__saved_model_init_op"  # TF2's init op, kept as a signature


def node_name(tensor):
    """The node a graph input or tensor name refers to: '^a', 'a:1' and 'a' are all 'a'
    (in a function body, 'a:output:0' too)."""
    return tensor.lstrip("^").split(":")[0]


def called_functions(node, library):
    """Names of the `library` functions `node` calls: by a function attribute (`f` of a
    call, the branches of `If`, the body of `While`...) or as its op type (TF1 `Defun`)."""
    names = [value.func.name for value in node.attr.values() if value.HasField("func")]
    names += [function.name for value in node.attr.values() for function in value.list.func]
    return [name for name in names + [node.op] if name in library]


def closure(roots, neighbours):
    """Every name reachable from `roots` through `neighbours(name)`, roots included."""
    seen, pending = set(), list(roots)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(neighbours(name))
    return seen


def inputs_of(nodes):
    """neighbours for `closure` over `nodes`: a node's data and control inputs among them."""
    return lambda name: [node_name(tensor) for tensor in nodes[name].input if node_name(tensor) in nodes]


def function_calls(library):
    """neighbours for `closure` over `library`: the functions a function's nodes call."""
    return lambda name: [called for node in library[name].node_def for called in called_functions(node, library)]


def _named_nodes(meta_graph):
    """Nodes the meta graph names outside its nodes: signature tensors, collections."""
    named = [info.name for signature in meta_graph.signature_def.values()
             for infos in (signature.inputs, signature.outputs) for info in infos.values()]
    named += [name for collection in meta_graph.collection_def.values() for name in collection.node_list.value]
    return {node_name(name) for name in named}


def library_of(graph_def):
    """{name: FunctionDef} of a GraphDef's function library."""
    return {function.signature.name: function for function in graph_def.library.function}


def _calls(nodes, names, library):
    """Every library function the nodes `names` call."""
    return [called for name in names for called in called_functions(nodes[name], library)]


def _saver_only(meta_graph, nodes, library):
    """(graph nodes, functions) that only the saver of the variables reaches: what its save
    and restore ops need and nothing else in the meta graph (a signature, a collection, any
    other node or function) reads."""
    saver_def, known = meta_graph.saver_def, set(nodes)
    roots = {node_name(name) for name in (saver_def.save_tensor_name, saver_def.restore_op_name) if name}
    saver_nodes = closure(roots & known, inputs_of(nodes))
    other_roots = (known - saver_nodes) | (_named_nodes(meta_graph) & known)
    saver_only = saver_nodes - closure(other_roots, inputs_of(nodes))
    saver_functions = closure(_calls(nodes, saver_only, library), function_calls(library))
    other_functions = closure(_calls(nodes, known - saver_only, library) + list(set(library) - saver_functions),
                              function_calls(library))
    return saver_only, saver_functions - other_functions


def _refused_ops(meta_graph):
    """Op types of `meta_graph` outside the lists (names of functions that pose as ops included)."""
    from tensorflow.python.framework import op_def_registry

    nodes, library = {node.name: node for node in meta_graph.graph_def.node}, library_of(meta_graph.graph_def)
    saver_nodes, saver_functions = _saver_only(meta_graph, nodes, library)

    def refused(node, in_saver):
        allowed = PURE_OPS | VARIABLE_OPS | (SAVER_OPS if in_saver else frozenset())
        return node.op not in allowed and node.op not in library

    found = {node.op for node in nodes.values() if refused(node, node.name in saver_nodes)}
    found |= {node.op for name, function in library.items() for node in function.node_def
              if refused(node, name in saver_functions)}
    return found | {name for name in library if op_def_registry.get(name) is not None}  # a function posing as an op


def _init_ops(meta_graph):
    """(what the init op is called, op types it runs other than NoOp) for each init op."""
    nodes, library = {node.name: node for node in meta_graph.graph_def.node}, library_of(meta_graph.graph_def)
    roots = {key: list(meta_graph.collection_def[key].node_list.value) for key in INIT_OP_COLLECTIONS
             if key in meta_graph.collection_def}
    if INIT_OP_SIGNATURE in meta_graph.signature_def:
        roots[INIT_OP_SIGNATURE] = [info.name for info in meta_graph.signature_def[INIT_OP_SIGNATURE].outputs.values()]
    for key, names in roots.items():
        reached = closure({node_name(name) for name in names} & set(nodes), inputs_of(nodes))
        functions = closure(_calls(nodes, reached, library), function_calls(library))
        ops = {nodes[name].op for name in reached} | {node.op for name in functions for node in library[name].node_def}
        yield key, ops - {"NoOp"} - set(library)


def refuse_unsafe_ops(saved_model, path):
    """Raises unless every meta graph of `saved_model` holds only the listed ops and no
    init op that runs anything.

    Args:
        saved_model: a parsed `saved_model_pb2.SavedModel`.
        path: the SavedModel folder, for the message.

    Raises:
        UnsupportedLayerError: naming every op found outside the lists, or what an init
            op would run.
    """
    for meta_graph in saved_model.meta_graphs:
        refused = _refused_ops(meta_graph)
        if refused:
            raise UnsupportedLayerError(
                f"SavedModel '{path}' holds ops keras-embed does not run (file, Python, print, queue, dataset or "
                f"other ops outside its list of pure ops): {', '.join(sorted(refused))}; nothing was run; "
                "pass the .keras or .h5 file it came from"
            )
        for key, ops in _init_ops(meta_graph):
            if ops:
                raise UnsupportedLayerError(
                    f"SavedModel '{path}' has an init op ({key}) that runs {', '.join(sorted(ops))} when TensorFlow "
                    "loads it; keras-embed runs no init op and reads the variables from the checkpoint; nothing "
                    "was run; pass the .keras or .h5 file it came from"
                )

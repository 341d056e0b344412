"""The one internal picture of a network: layer nodes over tensors whose channels belong to groups.

Every node is one Keras layer (weights read-only, handed out as float64: `Weights`). The last axis of
every tensor holds channels, and every channel belongs to a *group*: the channels a
producer (Dense, Conv2D, ...) or a model input creates, joined with others where a
merging layer (Add, ...) adds them. A group's channels are kept, removed, merged or split
together in every layer that holds them, so a residual network stays valid. A tensor's
`layout` lists the groups along its last axis: `Concatenate` lays groups side by side,
`Flatten` repeats a layout once per spatial position. What each layer class means (its
channel role, its weights) lives in `registry`; this module only combines the answers.

A Dense chain is the simplest graph: one group per hidden layer.

Example:
    >>> graph = read_model(model)                       # keras_embed.model.read
    >>> graph.widths
    [32, 32, 10]
    >>> graph.layout("flatten")[:2]
    [Segment(group='conv_2', size=8), Segment(group='conv_2', size=8)]
"""

import dataclasses
import functools
import math

import numpy as np

from keras_embed.model import registry


def frozen_array(values):
    """A read-only float64 copy of `values` (None stays None; a read-only float64 array is its own copy)."""
    if values is None:
        return None
    if isinstance(values, np.ndarray) and values.dtype == np.float64 and not values.flags.writeable:
        return values
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


def _stored(values):
    """`values` read-only in its own floating dtype (float64 where it is not a NumPy float),
    copied so that no caller can change it."""
    array = np.asarray(values)
    if array.dtype.kind != "f":
        array = np.array(array, dtype=np.float64)
    elif array.flags.writeable:
        array = array.copy()
    array.setflags(write=False)
    return array


class Weights(tuple):
    """A layer's weights, kept in the dtype they came in and handed out as read-only float64.

    Weights read from a float32 model stay float32 (no float64 copy of the whole network);
    weights an edit computes stay float64. Each access gives an exactly equal float64 array
    that lives as long as its reader, so rules and edits compute in float64 one layer at a time.

    Example:
        >>> weights = Weights([np.ones((2, 3), np.float32)])
        >>> weights[0].dtype, weights.stored[0].dtype
        (dtype('float64'), dtype('float32'))
    """

    def __new__(cls, values=()):
        values = values.stored if isinstance(values, Weights) else values
        return super().__new__(cls, (_stored(value) for value in values))

    @property
    def stored(self):
        """The arrays as kept, in their own dtypes."""
        return tuple(super().__iter__())

    def __iter__(self):
        return (frozen_array(value) for value in super().__iter__())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(frozen_array(value) for value in super().__getitem__(index))
        return frozen_array(super().__getitem__(index))


@dataclasses.dataclass(frozen=True)
class Node:
    """One layer of a `Graph`.

    Args:
        name: the Keras layer name.
        kind: the Keras class name, a key of `registry.REGISTRY`.
        inputs: names of the nodes it reads, in call order.
        config: the layer's `get_config()` (activations as names).
        weights: its weights in `get_weights()` order (`Weights`: float64 on access).
        shape: its output shape without the batch axis.
    """

    name: str
    kind: str
    inputs: tuple
    config: dict = dataclasses.field(compare=False)
    weights: tuple = ()
    shape: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "weights", Weights(self.weights))

    @property
    def entry(self):
        """The registry entry of this node's layer class."""
        return registry.entry(self.kind, self.config)

    @property
    def role(self):
        return self.entry.role

    @property
    def dtype(self):
        """The dtype of an input node's values."""
        return self.config.get("dtype")

    @property
    def width(self):
        """Channels of the output (its last axis)."""
        return self.shape[-1]

    @property
    def params(self):
        return sum(weight.size for weight in self.weights.stored)

    @property
    def flops(self):
        """Floating-point operations per sample: 2 per multiply-add, 1 per bias add."""
        return self.entry.flops(self)


@dataclasses.dataclass(frozen=True)
class Segment:
    """`size` channels of `group`, in order, on a tensor's last axis."""

    group: str
    size: int


@dataclasses.dataclass(frozen=True)
class Graph:
    """Nodes in topological order (the model inputs first), and the names of the outputs.

    Args:
        name: the model name.
        nodes: `Node`s, each after the nodes it reads.
        outputs: names of the nodes whose outputs are the model's, in order.
        sequential: rebuild as a `keras.Sequential` model when it is still a chain.
        nested: names of the models nested in the one read, whose layers the graph holds
            directly (a model is rebuilt flat).
    """

    name: str
    nodes: tuple
    outputs: tuple
    sequential: bool = False
    nested: tuple = ()

    @functools.cached_property
    def by_name(self):
        return {node.name: node for node in self.nodes}

    def node(self, name):
        """The node called `name`.

        Raises:
            ValueError: naming the layers there are.
        """
        if name not in self.by_name:
            raise ValueError(f"no layer {name!r}; layers are: {', '.join(self.by_name)}")
        return self.by_name[name]

    @property
    def inputs(self):
        """The model's input nodes, in order."""
        return [node for node in self.nodes if node.role == "input"]

    @functools.cached_property
    def readers(self):
        """Node name -> names of the nodes that read it (once per use)."""
        readers = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for source in node.inputs:
                readers[source].append(node.name)
        return readers

    @functools.cached_property
    def _channels(self):
        """(group of every space, layouts in spaces, frozen groups) from one pass in order."""
        parent, layouts, frozen = {}, {}, set()

        def find(space):
            while parent[space] != space:
                parent[space] = parent[parent[space]]
                space = parent[space]
            return space

        for node in self.nodes:
            sources = [layouts[source] for source in node.inputs]
            role, entry = node.role, node.entry
            if role in ("input", "produces"):
                parent[node.name] = node.name
                layouts[node.name] = [Segment(node.name, node.width)]
                if role == "input" or entry.freezes(node):
                    frozen.add(node.name)
                if entry.freezes_inputs(node):
                    frozen.update(segment.group for layout in sources for segment in layout)
                continue
            if role == "concatenates":
                layouts[node.name] = [segment for layout in sources for segment in layout]
            elif role == "reshapes":
                positions = math.prod(self.by_name[node.inputs[0]].shape[:-1])
                layouts[node.name] = sources[0] * positions
            else:
                layouts[node.name] = sources[0]
            if role == "merges":
                _join(sources, parent, find, frozen)
            if entry.freezes(node):
                frozen.update(segment.group for layout in sources for segment in layout)
        for name in self.outputs:
            frozen.update(segment.group for segment in layouts[name])
        groups = {space: find(space) for space in parent}
        return groups, layouts, {groups[space] for space in frozen}

    def group_of(self, space):
        """The group of a producer's or input's channels."""
        return self._channels[0][space]

    def layout(self, name):
        """The `Segment`s of the last axis of node `name`'s output, in order."""
        groups = self._channels[0]
        return [Segment(groups[segment.group], segment.size) for segment in self._channels[1][name]]

    @functools.cached_property
    def _positions(self):
        """Node name -> {group: (occurrences, channels) indices on its last axis}."""
        table = {}
        for node in self.nodes:
            rows, offset = {}, 0
            for segment in self.layout(node.name):
                rows.setdefault(segment.group, []).append(np.arange(offset, offset + segment.size))
                offset += segment.size
            table[node.name] = {group: np.array(found, dtype=int) for group, found in rows.items()}
        return table

    def positions(self, name, group):
        """Indices on node `name`'s last axis holding `group`, as an (occurrences, channels)
        array: one row per segment of that group."""
        return self._positions[name].get(group, np.zeros((0, 0), dtype=int))

    @functools.cached_property
    def _holders(self):
        holders = {}
        for node in self.nodes:
            for group in self._positions[node.name]:
                holders.setdefault(group, []).append(node.name)
        return holders

    def holders(self, group):
        """Names of the nodes whose output holds `group`, in order."""
        return self._holders.get(group, [])

    @property
    def frozen_groups(self):
        """Groups whose channels cannot change: the inputs', the outputs', and those a
        layer mixes (softmax, normalisation over the channels)."""
        return self._channels[2]

    def spaces(self, group):
        """The producer nodes whose output channels form `group`."""
        return [self.by_name[name] for name in self.holders(group)
                if self.by_name[name].role == "produces" and self.group_of(name) == group]

    def group_width(self, group):
        return self.by_name[group].width

    def editable_groups(self):
        """Groups that rules and operators may change, in the order of their first producer."""
        seen = {}
        for node in self.producers:
            group = self.group_of(node.name)
            if group not in self.frozen_groups:
                seen.setdefault(group, None)
        return list(seen)

    def approximable_groups(self):
        """Editable groups the approximate modes may change from statistics of their values:
        not a recurrent layer's units (each is read by the others at every step)."""
        return [group for group in self.editable_groups()
                if all(node.entry.statistics_suffice for node in self.spaces(group))]

    def readers_of(self, group):
        """(reader, source name) for every producer reading a tensor that holds `group`."""
        return [(self.by_name[reader], source) for source in self.holders(group) for reader in self.readers[source]
                if self.by_name[reader].role == "produces"]

    def elementwise_after(self, producer):
        """The elementwise nodes (Activation, Dropout) that follow `producer`, each the one
        reader of the one before."""
        chain, name = [], producer.name
        while name not in self.outputs and len(self.readers[name]) == 1:
            reader = self.by_name[self.readers[name][0]]
            if not reader.entry.elementwise:
                break
            chain.append(reader)
            name = reader.name
        return chain

    def elementwise_chain(self, producer):
        """(`elementwise_after(producer)`, the one producer reading the last of them), or
        None when what they compute goes elsewhere too (or to an output)."""
        chain = self.elementwise_after(producer)
        end = chain[-1].name if chain else producer.name
        readers = self.readers[end]
        if end in self.outputs or len(readers) != 1 or self.by_name[readers[0]].role != "produces":
            return None
        return chain, self.by_name[readers[0]]

    @property
    def producers(self):
        return [node for node in self.nodes if node.role == "produces"]

    @property
    def widths(self):
        """Channels of every producer, in order."""
        return [node.width for node in self.producers]

    @property
    def params(self):
        return sum(node.params for node in self.nodes)

    @property
    def flops(self):
        return sum(node.flops for node in self.nodes)

    def with_nodes(self, nodes):
        """A new graph of `nodes` (same name, outputs and kind)."""
        return dataclasses.replace(self, nodes=tuple(nodes))

    def up_to(self, names):
        """The graph cut to the nodes the tensors `names` are computed from (a probe of an
        early layer builds and loads only those layers)."""
        needed, frontier = set(), list(names)
        while frontier:
            name = frontier.pop()
            if name not in needed:
                needed.add(name)
                frontier.extend(self.by_name[name].inputs)
        return self.with_nodes(node for node in self.nodes if node.name in needed)


def _join(sources, parent, find, frozen):
    """Joins the groups a merging layer adds segment by segment; freezes them when the
    inputs' layouts do not line up (an Add of a concatenation and one group, say)."""
    if len({tuple(segment.size for segment in layout) for layout in sources}) != 1:
        frozen.update(segment.group for layout in sources for segment in layout)
        return
    for segments in zip(*sources):
        roots = [find(segment.group) for segment in segments]
        for root in roots[1:]:
            parent[root] = roots[0]

"""Channels a network can do without, from its weights (and data constants, when known).

The redundancy the width embeddings of the Embedding Principle leave behind, per group
(channels an `Add` joins are judged across every branch):
- zero-out: every producer reading the channel gives it zero weight (the null embedding),
  a recurrent layer producing it too, in the rows with which it reads it at the next step;
- constant: the channel holds one value on every input (a zero kernel slice in every
  producer, carried through the layers on its way; or constant on the calibration data);
  its readers' biases absorb it, where no reader pads with zeros (a constant 0 folds
  everywhere) and no recurrent layer reads it (it does from a zero state: a recurrent unit
  goes only when its weights make it zero); zero on the data is *dead*;
- duplicate: two channels equal in every producer and per-channel layer of the group (the
  one-step splitting embedding), or positive multiples where every layer on their way
  commutes with positive scaling (relu family, pooling, Flatten, Concatenate, Add):
  readers add the row of one into the other's.
Groups holding a model input or output, or mixed by a layer (softmax), never change.

Example:
    >>> edits = find_redundancy(graph, rtol=1e-6)
    >>> edits[0].removed()
    {'zero_out': 1, 'dead': 0, 'constant': 0, 'duplicate': 3}
"""

import numpy as np

from keras_embed.edit.heads import find_head_edits
from keras_embed.edit.plan import GroupEdit, Merge
from keras_embed.errors import check_number
from keras_embed.find.constants import weight_constants
from keras_embed.find.grouping import close_groups


def _rows(reader, positions):
    """The reader's weights at input `positions`, one flat row per position."""
    return np.moveaxis(reader.entry.kernel(reader), -2, 0)[positions].reshape(len(positions), -1)


def _readers(graph, group):
    """(reader, source, occurrence positions) for every producer reading `group`."""
    return [(reader, source, graph.positions(source, group)) for reader, source in graph.readers_of(group)]


def _constant_channels(graph, group, readers, constants):
    """Per channel: whether every reader can absorb its value at every occurrence."""
    absorbed = np.ones(graph.group_width(group), dtype=bool)
    for reader, source, positions in readers:
        for occurrence in positions:
            value = constants[source][occurrence]
            absorbed &= ~np.isnan(value) & ((not reader.entry.reads_zero_padding(reader)) | (value == 0))
    return absorbed


def _zero_out(graph, group, readers, rtol):
    zero = np.ones(graph.group_width(group), dtype=bool)
    for reader, _, positions in readers:
        scale = float(np.abs(reader.entry.kernel(reader)).max(initial=0.0))
        for occurrence in positions:
            zero &= np.abs(_rows(reader, occurrence)).max(axis=1, initial=0.0) <= rtol * scale
    for rows in _own_rows(graph, group):
        zero &= np.abs(rows).max(axis=1, initial=0.0) <= rtol * float(np.abs(rows).max(initial=0.0))
    return zero


def _own_rows(graph, group):
    """The rows with which the group's recurrent producers read it at the step before."""
    return [rows for node in graph.spaces(group) if (rows := node.entry.own_rows(node)) is not None]


def _zero_state(graph, group, constants):
    """Per channel: whether it is zero, from the weights, in every producer of the group that
    reads its own output (a recurrent layer reads it from a zero state, where only 0 folds)."""
    zero = np.ones(graph.group_width(group), dtype=bool)
    for node in graph.spaces(group):
        if node.entry.own_rows(node) is not None:
            zero &= constants[node.name] == 0
    return zero


def zero_out_channels(graph, group, rtol=1e-6):
    """Per channel of `group`: whether every producer reading it gives it zero weight."""
    return _zero_out(graph, group, _readers(graph, group), rtol)


def signatures(graph, group):
    """(per channel of `group`, the weights that make it: (channels, k)), and whether the
    channels' path commutes with positive scaling (then only the producers' part, first,
    may be a multiple; the per-channel layers' part must be equal). The producers' part is
    normalized per channel when it does, and its norms come back as the third value."""
    producers = np.hstack([node.entry.unit_columns(node) for node in graph.spaces(group)])
    per_channel, homogeneous = [], all(node.entry.homogeneous(node) for node in graph.spaces(group))
    for name in graph.holders(group):
        node = graph.by_name[name]
        if node.role == "produces":
            continue
        homogeneous &= node.entry.homogeneous(node)
        for positions in graph.positions(node.inputs[0], group) if node.weights else ():
            per_channel.append(node.entry.channel_params(node)[positions])
    return producers, np.hstack(per_channel) if per_channel else np.zeros((len(producers), 0)), homogeneous


def duplicates(graph, group, candidates, rtol=1e-6):
    """`Merge`s among `candidates`: channels equal (or, on a path that commutes with positive
    scaling, positive multiples) to another, within `rtol` of the largest weight."""
    producers, per_channel, homogeneous = signatures(graph, group)
    candidates = np.asarray(candidates, dtype=int)
    norms = np.linalg.norm(producers[candidates], axis=1)
    if homogeneous:  # sigma(c z) = c sigma(z): compare directions, keep the norms as scales
        scale = np.where(norms > 0, norms, 1.0)[:, None]
        parts = [producers[candidates] / scale]
        tol = rtol
    else:
        parts, tol = [producers[candidates]], rtol * float(np.abs(producers).max(initial=0.0))
    reference = float(np.abs(per_channel).max(initial=0.0))
    if per_channel.shape[1]:  # per-channel weights must agree, on the producers' scale
        parts.append(per_channel[candidates] * (tol / (rtol * reference) if reference > 0 else 1.0))
    merges = []
    for members in close_groups(np.hstack(parts), tol):
        keep, *rest = members
        scales = tuple(float(norms[unit] / norms[keep]) if homogeneous and norms[keep] > 0 else 1.0 for unit in rest)
        merges.append(Merge(int(candidates[keep]), tuple(int(candidates[unit]) for unit in rest), scales))
    return tuple(merges)


def _folds(readers, constants, channels):
    """(source, position, value) of the given constant channels wherever a reader reads
    them (zeros need no fold)."""
    found = {}
    for _, source, positions in readers:
        for occurrence in positions:
            for position in occurrence[channels]:
                value = float(constants[source][position])
                if value != 0:
                    found[(source, int(position))] = value
    return tuple((source, position, value) for (source, position), value in found.items())


def _nonzero(readers, constants, width):
    """Per channel: whether it holds a value other than 0 somewhere a reader reads it."""
    found = np.zeros(width, dtype=bool)
    for _, source, positions in readers:
        for occurrence in positions:
            found |= np.nan_to_num(constants[source][occurrence], nan=1.0) != 0
    return found


def _indices(mask):
    return tuple(int(channel) for channel in np.flatnonzero(mask))


def group_edit(graph, group, constants, rtol=1e-6, data_constants=None):
    """The `GroupEdit` of one group: zero-out, constant (dead on the data) and duplicate channels."""
    readers, width = _readers(graph, group), graph.group_width(group)
    zero_out, zero_state = _zero_out(graph, group, readers, rtol), _zero_state(graph, group, constants)
    constant = _constant_channels(graph, group, readers, constants) & zero_state & ~zero_out
    on_data = np.zeros(width, dtype=bool)
    if data_constants is not None:
        constants = {name: np.where(np.isnan(values), data_constants.get(name, values), values)
                     for name, values in constants.items()}
        on_data = _constant_channels(graph, group, readers, constants) & zero_state & ~zero_out & ~constant
    if (zero_out | constant | on_data).all():  # keep one channel: a layer of width 0 is not a layer
        zero_out[0] = constant[0] = on_data[0] = False
    dead = on_data & ~_nonzero(readers, constants, width)
    folded = constant | (on_data & ~dead)
    candidates = np.flatnonzero(~(zero_out | constant | on_data))
    return GroupEdit(group, width, zero_out=_indices(zero_out), dead=_indices(dead), constant=_indices(folded),
                     merges=duplicates(graph, group, candidates, rtol) if len(candidates) > 1 else (),
                     values=_folds(readers, constants, np.flatnonzero(folded)))


def find_redundancy(graph, rtol=1e-6, data_constants=None):
    """One round of the rules on every editable group of `graph`; nothing is changed.

    Args:
        graph: the `Graph` to inspect.
        rtol: relative tolerance: weights count as zero within `rtol` times the largest of
            their layer, channels as duplicates within `rtol` of the largest weight (of
            their directions, on a path that commutes with positive scaling).
        data_constants: tensor name -> per position its value on the calibration data
            (NaN where it varies), from `constants.data_constants`; its constant channels
            are *dead* (zero) or *constant* on the data.

    Returns:
        One `GroupEdit` per group that loses channels, in graph order, then one `HeadEdit`
        per attention layer that loses heads (`edit.heads`).
    """
    rtol = check_number("rtol", rtol, low=0)
    constants = weight_constants(graph, rtol)
    edits = (group_edit(graph, group, constants, rtol, data_constants) for group in graph.editable_groups())
    return tuple(edit for edit in edits if edit.removed_units) + find_head_edits(graph, rtol)

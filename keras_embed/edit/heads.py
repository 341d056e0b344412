"""Attention heads as units: the rules, the edit and the widening of MultiHeadAttention heads.

A head h reads the query, key and value through its own columns of the three projections
(kernels (inputs, heads, dim), biases (heads, dim)) and adds `attention_h @ V_h @ W_o[h]`
to the output (output kernel (heads, value_dim, outputs)). Since attention weights sum to 1
over the keys (no mask, no dropout at inference), exactly:
- a head whose output rows are zero, or whose value columns and bias are zero, adds nothing
  (*zero_out*);
- a head whose value kernel is zero adds the constant `b_v[h] @ W_o[h]`, which the output
  bias absorbs (*constant*);
- heads with the same query, key and value weights and biases compute the same values, so
  one keeps the sum of their output rows (*duplicate*).
`split_head` is the one-step embedding for heads (the test oracle of the last rule): a copy
of head h, output rows split `1 - alpha` and `alpha`.

Example:
    >>> edits = find_head_edits(graph)        # after split_head(graph, "attention", 1, 0.3)
    >>> edits[0].merges
    (Merge(keep=1, units=(4,), scales=(1.0,)),)
"""

import dataclasses
import math

import numpy as np

from keras_embed.edit.plan import HeadColumns, HeadEdit, Merge

_PARTS = ("query", "query_bias", "key", "key_bias", "value", "value_bias", "output", "output_bias")


def _lengths(graph, node):
    """The sequence lengths a MultiHeadAttention node attends over (query, value, key)."""
    return {graph.by_name[source].shape[-2] for source in node.inputs if len(graph.by_name[source].shape) >= 2}


def computes_wrongly(graph, node, heads):
    """Whether Keras (3.15, TensorFlow backend) would compute this layer wrongly with `heads`
    heads: measured, its attention differs from the definition (by 0.1 of the output scale)
    when the number of heads equals a sequence length, so no edit may make it so."""
    return heads in _lengths(graph, node)


def head_weights(node):
    """{part: array} of a MultiHeadAttention node (biases absent without `use_bias`)."""
    names = _PARTS if node.config.get("use_bias", True) else _PARTS[::2]
    return dict(zip(names, node.weights))


def _with_head_weights(node, parts, heads):
    names = _PARTS if node.config.get("use_bias", True) else _PARTS[::2]
    return dataclasses.replace(node, weights=tuple(parts[name] for name in names),
                               config={**node.config, "num_heads": heads, "key_dim": parts["query"].shape[-1],
                                       "value_dim": parts["value"].shape[-1]})


def _per_head(parts, names):
    """Every head's weights among `names` as one row (heads, ...)."""
    return np.concatenate([np.moveaxis(parts[name], -2 if name in ("query", "key", "value") else 0, 0)
                           .reshape(parts["output"].shape[0], -1) for name in names if name in parts], axis=1)


def _small(values, scale, rtol):
    return np.abs(values).reshape(len(values), -1).max(axis=1, initial=0.0) <= rtol * scale


def head_edit(node, rtol=1e-6):
    """The `HeadEdit` of one MultiHeadAttention node (nothing removed: no head is redundant)."""
    parts = head_weights(node)
    heads = parts["output"].shape[0]
    scale = max(float(np.abs(weight).max(initial=0.0)) for weight in node.weights)
    silent = _small(parts["output"], scale, rtol)
    flat_values = _small(_per_head(parts, ("value",)), scale, rtol)
    value_free = flat_values & _small(_per_head(parts, ("value_bias",)), scale, rtol) if "value_bias" in parts \
        else flat_values
    zero_out = tuple(int(head) for head in np.flatnonzero(silent | value_free))
    constant = tuple(int(head) for head in np.flatnonzero(flat_values & ~silent & ~value_free))
    rows = _per_head(parts, ("query", "query_bias", "key", "key_bias", "value", "value_bias"))
    taken, merges = set(zero_out + constant), []
    for keep in range(heads):
        if keep in taken:
            continue
        same = [other for other in range(keep + 1, heads) if other not in taken
                and np.abs(rows[other] - rows[keep]).max(initial=0.0) <= rtol * scale]
        if same:
            taken.update(same)
            merges.append(Merge(keep, tuple(same), (1.0,) * len(same)))
    return HeadEdit(node.name, heads, zero_out, constant, tuple(merges))


def column_edit(node, rtol=1e-6):
    """The `HeadColumns` of one MultiHeadAttention node, or None. Inside head h, exactly
    (attention sums to 1 over the keys, and a term constant over the keys leaves the softmax
    as it is):
    - a value column whose output rows are zero, or whose kernel column and bias are zero,
      adds nothing; one whose kernel column alone is zero adds its bias times its output
      rows, a constant the output bias absorbs; a copy of another value column (kernel and
      bias) gives it its output rows;
    - a query/key column whose query kernel column and bias are zero, or whose key kernel
      column is zero (the key then constant), adds nothing to the softmax; one whose query
      equals another's adds its key to that one's (q k1 + q k2 = q (k1 + k2)), and one
      whose key equals another's its query.
    Keras gives every head one key_dim and one value_dim, so every head loses as many
    columns as the head that can lose fewest (keeping at least one)."""
    parts = head_weights(node)
    scale = max(float(np.abs(weight).max(initial=0.0)) for weight in node.weights)

    def small(values, axis):
        return np.abs(values).max(axis=axis, initial=0.0) <= rtol * scale

    value_flat = small(parts["value"], 0)  # (heads, value_dim)
    value_free = value_flat & small(parts["value_bias"][..., None], -1) if "value_bias" in parts else value_flat
    value_silent = small(parts["output"], -1) | value_free
    key_silent = small(parts["key"], 0) | (small(parts["query"], 0) & (
        small(parts["query_bias"][..., None], -1) if "query_bias" in parts else True))
    value_copies = _copies(_columns_of(parts, "value"), value_silent | value_flat, rtol * scale)
    query_copies = _copies(_columns_of(parts, "query"), key_silent, rtol * scale)
    involved = key_silent.copy()
    for head, copies in enumerate(query_copies):
        involved[head, list(copies) + list(copies.values())] = True
    key_copies = _copies(_columns_of(parts, "key"), involved, rtol * scale)
    key_copies = [{**by_query, **by_key} for by_query, by_key in zip(query_copies, key_copies)]

    def kept(removable, copies):
        for head, found in enumerate(copies):
            removable[head, list(found)] = True
        count = min(int(removable.sum(axis=1).min()), removable.shape[1] - 1)
        gone = [np.flatnonzero(row)[:count].tolist() for row in removable]
        return count, tuple(tuple(c for c in range(removable.shape[1]) if c not in row) for row in gone), gone

    key_count, key_kept, key_gone = kept(key_silent.copy(), key_copies)
    value_count, value_kept, value_gone = kept(value_silent | value_flat, value_copies)
    if not key_count and not value_count:
        return None
    constant = tuple((head, column) for head, row in enumerate(value_gone) for column in row
                     if column not in value_copies[head] and value_flat[head, column] and not value_silent[head, column])
    key_merges = tuple((head, key_copies[head][drop], drop, "key" if drop in query_copies[head] else "query")
                       for head, row in enumerate(key_gone) for drop in row if drop in key_copies[head])
    value_merges = tuple((head, value_copies[head][drop], drop) for head, row in enumerate(value_gone)
                         for drop in row if drop in value_copies[head])
    return HeadColumns(node.name, parts["output"].shape[0], parts["query"].shape[-1], parts["value"].shape[-1],
                       key_kept, value_kept, constant, key_merges, value_merges)


def _columns_of(parts, name):
    """(heads, columns, inputs + 1): each column of projection `name` with its bias."""
    kernel = np.moveaxis(parts[name], 0, -1)
    bias = parts.get(f"{name}_bias", np.zeros(kernel.shape[:2]))
    return np.concatenate([kernel, bias[..., None]], axis=-1)


def _copies(columns, excluded, tolerance):
    """Per head {drop: keep}: a column equal (within `tolerance`) to an earlier one, neither `excluded`."""
    found = []
    for head in range(columns.shape[0]):
        copies = {}
        for drop in range(columns.shape[1]):
            keep = next((keep for keep in range(drop) if not excluded[head, keep] and keep not in copies
                         and np.abs(columns[head, keep] - columns[head, drop]).max() <= tolerance), None)
            if keep is not None and not excluded[head, drop]:
                copies[drop] = keep
        found.append(copies)
    return found


def apply_head_columns(graph, edit):
    """`graph` with the query/key and value columns of `edit` kept in every head of its
    layer (the query scaled by sqrt(new key_dim / key_dim), so the scores stay)."""
    node, parts = _planned(graph, edit)
    parts = {name: values.copy() for name, values in parts.items()}
    for head, keep, drop, side in edit.key_merges:
        for name in (side, f"{side}_bias"):
            if name in parts:
                parts[name][..., head, keep] += parts[name][..., head, drop]
    for head, keep, drop in edit.value_merges:
        parts["output"][head, keep] += parts["output"][head, drop]
    key_kept, value_kept = np.asarray(edit.key_kept), np.asarray(edit.value_kept)
    if "output_bias" in parts and edit.constant:
        heads, columns = (list(axis) for axis in zip(*edit.constant))
        parts["output_bias"] = parts["output_bias"] + np.einsum(
            "c,co->o", parts["value_bias"][heads, columns], parts["output"][heads, columns])
    shrink = math.sqrt(key_kept.shape[1] / edit.key_dim)
    for name, kept in (("query", key_kept), ("key", key_kept), ("value", value_kept)):
        parts[name] = np.take_along_axis(parts[name], kept[None], axis=2) * (shrink if name == "query" else 1.0)
        if f"{name}_bias" in parts:
            parts[f"{name}_bias"] = np.take_along_axis(parts[f"{name}_bias"], kept, axis=1) * (
                shrink if name == "query" else 1.0)
    parts["output"] = np.take_along_axis(parts["output"], value_kept[..., None], axis=1)
    return graph.with_nodes([_with_head_weights(node, parts, edit.heads) if item.name == node.name else item
                             for item in graph.nodes])


def find_head_edits(graph, rtol=1e-6):
    """One `HeadEdit` per MultiHeadAttention node of `graph` that loses heads (none where the
    heads left would equal a sequence length: `computes_wrongly`), else its `HeadColumns`
    when columns inside the heads go (the next round looks again)."""
    edits = []
    for node in (node for node in graph.nodes if node.entry.has_heads):
        edit = head_edit(node, rtol)
        if not edit.removed_heads or computes_wrongly(graph, node, len(edit.kept_heads)):
            edit = column_edit(node, rtol)
        if edit is not None:
            edits.append(edit)
    return tuple(edits)


def _planned(graph, edit):
    """(node, its `head_weights`) of the layer of a head edit, checked against the heads it was planned for."""
    node = graph.by_name[edit.layer]
    parts = head_weights(node)
    if parts["output"].shape[0] != edit.heads:
        raise ValueError(f"plan for layer '{edit.layer}' was made for {edit.heads} heads; it has "
                         f"{parts['output'].shape[0]}")
    return node, parts


def apply_head_edit(graph, edit):
    """`graph` with the heads of `edit` removed from its layer (its outputs unchanged)."""
    node, parts = _planned(graph, edit)
    output = parts["output"].copy()
    for merge in edit.merges:
        output[merge.keep] += output[list(merge.units)].sum(axis=0)
    if edit.constant and "output_bias" in parts:
        parts["output_bias"] = parts["output_bias"] + np.einsum(
            "hv,hvo->o", parts["value_bias"][list(edit.constant)], output[list(edit.constant)])
    parts["output"] = output
    return _keeping(graph, node, parts, edit.kept_heads)


def apply_head_refit(graph, edit):
    """`graph` with only the heads `edit.kept` of its layer, whose output projection (and
    bias) the edit gives (see `find.head_refit`)."""
    node, parts = _planned(graph, edit)
    output = parts["output"].copy()
    output[list(edit.kept)] = edit.output
    parts["output"] = output
    if edit.bias is not None:
        parts["output_bias"] = np.asarray(edit.bias)
    return _keeping(graph, node, parts, edit.kept)


def _keeping(graph, node, parts, kept):
    """`graph` with `node` of weights `parts` cut to the heads `kept`."""
    kept = list(kept)
    for name, values in parts.items():
        if name != "output_bias":  # the heads axis: second of a projection kernel, first of the rest
            parts[name] = values[:, kept] if name in ("query", "key", "value") else values[kept]
    return graph.with_nodes([_with_head_weights(node, parts, len(kept)) if item.name == node.name else item
                             for item in graph.nodes])


def split_head(graph, layer, head, alpha):
    """`graph` with head `head` of MultiHeadAttention `layer` copied: the old head's output
    rows weighted `1 - alpha`, the copy's `alpha` (the same outputs)."""
    node = graph.by_name[layer]
    parts = head_weights(node)
    heads = parts["output"].shape[0]
    if not 0 <= head < heads:
        raise ValueError(f"layer '{layer}' has {heads} heads; head {head} is not one of them")
    if computes_wrongly(graph, node, heads + 1):
        raise ValueError(f"layer '{layer}' would get {heads + 1} heads, its sequence length: Keras' "
                         "MultiHeadAttention computes wrongly with as many heads as positions; split a head twice")
    grown = {}
    for name, values in parts.items():
        if name in ("query", "key", "value"):
            grown[name] = np.concatenate([values, values[:, [head]]], axis=1)
        elif name == "output":
            grown[name] = np.concatenate([values, alpha * values[[head]]], axis=0)
            grown[name][head] *= 1.0 - alpha
        elif name == "output_bias":
            grown[name] = values
        else:
            grown[name] = np.concatenate([values, values[[head]]], axis=0)
    return graph.with_nodes([_with_head_weights(node, grown, heads + 1) if item.name == layer else item
                             for item in graph.nodes])

"""Applies a `Plan` to a `Graph`, returning a new graph; the graph passed in never changes.

Every group edit (a `GroupEdit`, `Refit` or `Split`) is checked against the graph, then
becomes a `ChannelMap` (`channels`) applied to every layer that holds its group; the
constants removed channels held go into their readers' biases. A `Collapse` replaces a
producer by its composition with what reads it (`compose`), a `HeadEdit` the heads of an
attention layer (`heads`).

Example:
    >>> plan = plan_exact(graph)                       # keras_embed.pipeline
    >>> apply_plan(graph, plan).widths
    [16, 10]
"""

import numpy as np

from keras_embed.edit.channels import ChannelMap, apply_maps, layout_gather
from keras_embed.edit.compose import compose
from keras_embed.edit.heads import apply_head_columns, apply_head_edit, apply_head_refit
from keras_embed.edit.plan import Collapse, GroupEdit, HeadColumns, HeadEdit, HeadRefit, Refit


def _check(edit, graph):
    """Validates an edit against the graph before anything is computed."""
    if edit.group not in graph.editable_groups():
        raise ValueError(f"plan names group '{edit.group}', which this graph cannot change; "
                         f"editable groups: {', '.join(graph.editable_groups()) or 'none'}")
    width = graph.group_width(edit.group)
    if edit.width != width:
        raise ValueError(f"plan was made for group '{edit.group}' of width {edit.width}, found width {width}")
    if isinstance(edit, GroupEdit):
        removed, keeps = edit.removed_units, [merge.keep for merge in edit.merges]
        if len(set(removed)) != len(removed) or set(removed) & set(keeps):
            raise ValueError(f"plan for group '{edit.group}' removes a channel twice or removes a kept one")
        if any(not 0 <= channel < width for channel in (*removed, *keeps)):
            raise ValueError(f"plan for group '{edit.group}' names a channel outside 0..{width - 1}")
        if edit.width_after < 1:
            raise ValueError(f"plan for group '{edit.group}' removes every channel")


def _channel_map(edit):
    """The `ChannelMap` of a `GroupEdit`, `Refit` or `Split`."""
    if isinstance(edit, GroupEdit):
        return ChannelMap.removing(edit.width, edit.removed_units, edit.merges)
    if isinstance(edit, Refit):
        return ChannelMap(np.asarray(edit.kept, dtype=int), np.asarray(edit.mix), np.asarray(edit.shift))
    return ChannelMap.splitting(edit.width, edit.channel, edit.alpha)


_LAYER_EDITS = (Collapse, HeadColumns, HeadEdit, HeadRefit)  # edits of one layer, not of a channel group


def apply_round(graph, edits):
    """Applies edits planned on `graph` together (at most one per group, plus collapses and
    head edits)."""
    groups = [edit for edit in edits if not isinstance(edit, _LAYER_EDITS)]
    for edit in groups:
        _check(edit, graph)
    if groups:
        folds = {}
        for edit in groups:
            for source, position, value in getattr(edit, "values", ()):
                folds.setdefault(source, []).append((position, value))
        graph = apply_maps(graph, {edit.group: _channel_map(edit) for edit in groups}, folds)
    for edit in edits:
        if isinstance(edit, Collapse):
            graph = compose(graph, edit)
        elif isinstance(edit, HeadEdit):
            graph = apply_head_edit(graph, edit)
        elif isinstance(edit, HeadRefit):
            graph = apply_head_refit(graph, edit)
        elif isinstance(edit, HeadColumns):
            graph = apply_head_columns(graph, edit)
    return graph


def apply_plan(graph, plan):
    """Applies every round of `plan` in order; returns a new `Graph`."""
    for round_ in plan.rounds:
        graph = apply_round(graph, round_)
    return graph


def follow(graph, edits, arrays, after=None):
    """`arrays` ({tensor name: one value per position of its last axis, e.g. `Regimes`
    with `subset`}) re-indexed for the graph `edits` make of `graph` (`after`, when known);
    tensors that go, or whose positions a collapse changed, are dropped."""
    after = apply_round(graph, edits) if after is None else after
    maps = {edit.group: _channel_map(edit) for edit in edits if not isinstance(edit, _LAYER_EDITS)}
    collapses = any(isinstance(edit, Collapse) for edit in edits)
    return {name: _take(values, layout_gather(graph, name, maps)) for name, values in arrays.items()
            if name in after.by_name and not (collapses and after.by_name[name].shape != graph.by_name[name].shape)}


def _take(values, index):
    return values.subset(index) if hasattr(values, "subset") else values[index]

"""Plans of edits: pure data, printable and serializable to JSON.

`GroupEdit` removes channels of one channel group (dropped, folded into the readers'
biases or merged into a copy they duplicate); `Refit` keeps some channels of a group and
gives the readers new weights fitted on data (approximate); `Split` copies a channel (the
widening embedding); `Collapse` composes a layer that is linear on the data with the one
layer reading it; `HeadEdit` removes attention heads of one layer. `surgery.apply_plan`
carries them out.

Example:
    >>> edit = GroupEdit("h", width=4, zero_out=(3,), merges=(Merge(0, (2,), (1.0,)),))
    >>> edit.width_after
    2
    >>> Plan(((edit,),)).removed()
    {'zero_out': 1, 'dead': 0, 'constant': 0, 'duplicate': 1}
"""

import dataclasses

import numpy as np

KINDS = ("zero_out", "dead", "constant", "duplicate")


@dataclasses.dataclass(frozen=True)
class Merge:
    """Channels that compute `scale * (channel keep)`: their reader weights move onto `keep`.

    Args:
        keep: the channel that stays.
        units: the channels merged into it.
        scales: for each merged channel, its value divided by that of `keep`.
    """

    keep: int
    units: tuple
    scales: tuple


@dataclasses.dataclass(frozen=True)
class GroupEdit:
    """Channels to remove from one group, by index.

    Args:
        group: the group (named after its first producer).
        width: its width when the edit was planned (checked before applying).
        zero_out: channels every reader gives zero weight: dropped.
        dead: channels zero on the data: dropped.
        negligible: channels of negligible amplitude (condense mode, approximate): dropped.
        constant: channels with one value on every input (or on the data): their readers'
            biases absorb it.
        merges: duplicate groups, each merged into one channel.
        values: (source, position, value): what a constant channel holds at `position` of
            tensor `source`, which a reader's bias absorbs.
    """

    group: str
    width: int
    zero_out: tuple = ()
    dead: tuple = ()
    negligible: tuple = ()
    constant: tuple = ()
    merges: tuple = ()
    values: tuple = ()

    @property
    def removed_units(self):
        merged = [unit for merge in self.merges for unit in merge.units]
        return tuple(sorted((*self.zero_out, *self.dead, *self.negligible, *self.constant, *merged)))

    @property
    def kept_units(self):
        removed = set(self.removed_units)
        return tuple(unit for unit in range(self.width) if unit not in removed)

    @property
    def width_after(self):
        return self.width - len(self.removed_units)

    def removed(self):
        """Channels removed, counted by kind."""
        counts = {"zero_out": len(self.zero_out), "dead": len(self.dead), "constant": len(self.constant),
                  "duplicate": sum(len(merge.units) for merge in self.merges)}
        if self.negligible:
            counts["negligible"] = len(self.negligible)
        return counts


@dataclasses.dataclass(frozen=True)
class Refit:
    """Keeps channels `kept` of `group`; channel j of the old group is read as
    `mix[:, j] @ kept channels + shift[j]` (fitted on data: an approximation)."""

    group: str
    width: int
    kept: tuple
    mix: np.ndarray = dataclasses.field(compare=False)
    shift: np.ndarray = dataclasses.field(compare=False)

    def removed(self):
        return {"refit": self.width - len(self.kept)}


@dataclasses.dataclass(frozen=True)
class Split:
    """Appends a copy of `channel` to `group`; readers weigh the old one by `1 - alpha`
    and the copy by `alpha` (the one-step embedding T^alpha)."""

    group: str
    width: int
    channel: int
    alpha: float

    def removed(self):
        return {}


@dataclasses.dataclass(frozen=True)
class Collapse:
    """Composes producer `layer`, linear on the data (channel j computes
    slopes[j] * z_j + intercepts[j] after its activations), with the one layer reading it."""

    layer: str
    width: int
    slopes: tuple
    intercepts: tuple

    def removed(self):
        return {}


@dataclasses.dataclass(frozen=True)
class HeadEdit:
    """Heads to remove from MultiHeadAttention `layer` (see `edit.heads`): `zero_out` add
    nothing, `constant` add a constant the output bias absorbs, `merges` are identical heads
    (the kept one's output rows take the others')."""

    layer: str
    heads: int
    zero_out: tuple = ()
    constant: tuple = ()
    merges: tuple = ()

    @property
    def removed_heads(self):
        return tuple(sorted((*self.zero_out, *self.constant, *(unit for merge in self.merges for unit in merge.units))))

    @property
    def kept_heads(self):
        return tuple(head for head in range(self.heads) if head not in set(self.removed_heads))

    def removed(self):
        return {"heads": len(self.removed_heads)}


@dataclasses.dataclass(frozen=True)
class HeadColumns:
    """Columns to keep inside every head of MultiHeadAttention `layer` (see `edit.heads`):
    per head the query/key columns `key_kept` (of `key_dim`) and the value columns
    `value_kept` (of `value_dim`), as many in every head; `constant` lists the (head, value
    column) pairs whose constant value the output bias absorbs; `key_merges` (head, keep,
    drop, side) add the `side` ("query" or "key") column of a copy to the one kept, and
    `value_merges` (head, keep, drop) a copy's output rows, before the columns go."""

    layer: str
    heads: int
    key_dim: int
    value_dim: int
    key_kept: tuple
    value_kept: tuple
    constant: tuple = ()
    key_merges: tuple = ()
    value_merges: tuple = ()

    def removed(self):
        return {"head_columns": self.heads * (self.key_dim - len(self.key_kept[0]) + self.value_dim
                                              - len(self.value_kept[0]))}


@dataclasses.dataclass(frozen=True)
class HeadRefit:
    """Keeps heads `kept` of MultiHeadAttention `layer` (of `heads`) and gives it the output
    projection `output` (kept, value_dim, outputs) and bias `bias` (None without one),
    fitted by least squares on the data (`find.head_refit`)."""

    layer: str
    heads: int
    kept: tuple
    output: np.ndarray
    bias: np.ndarray = None

    def removed(self):
        return {"heads": self.heads - len(self.kept)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rounds of edits; each round holds at most one edit per group and is planned on the
    graph the rounds before it produced."""

    rounds: tuple = ()

    def edits(self):
        return [edit for round_ in self.rounds for edit in round_]

    def removed(self, group=None):
        """Channels removed by kind, of one group or of the whole plan."""
        totals = dict.fromkeys(KINDS, 0)
        for edit in self.edits():
            if group in (None, getattr(edit, "group", None)):
                for kind, count in edit.removed().items():
                    totals[kind] = totals.get(kind, 0) + count
        return totals

    def duplicate_groups(self, group):
        """Number of duplicate sets merged in `group`."""
        return sum(len(edit.merges) for edit in self.edits() if isinstance(edit, GroupEdit) and edit.group == group)

    def collapsed_layers(self):
        return [edit.layer for edit in self.edits() if isinstance(edit, Collapse)]

    def to_dict(self):
        """A JSON-ready description; each edit names its kind, fitted matrices by their shape."""
        return {"rounds": [[_describe(edit) for edit in round_] for round_ in self.rounds]}


def _describe(edit):
    fields = {field.name: getattr(edit, field.name) for field in dataclasses.fields(edit)}
    if isinstance(edit, Refit):
        fields["mix"], fields["shift"] = list(np.shape(edit.mix)), list(np.shape(edit.shift))
    if isinstance(edit, HeadRefit):
        fields["output"] = list(np.shape(edit.output))
        fields["bias"] = None if edit.bias is None else list(np.shape(edit.bias))
    if isinstance(edit, (GroupEdit, HeadEdit)):
        fields["merges"] = [dataclasses.asdict(merge) for merge in edit.merges]
    if isinstance(edit, GroupEdit):
        fields["values"] = [list(value) for value in edit.values]
    return {"kind": type(edit).__name__, **fields}

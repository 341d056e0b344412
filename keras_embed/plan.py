"""A plan of edits: pure data, printable and serializable to JSON.

`LayerEdit` removes units of one hidden layer; `Collapse` composes a linearized hidden
layer into the next one.

Example:
    >>> edit = LayerEdit("h", width=4, zero_out=(3,), merges=(Merge(0, (2,), (1.0,)),))
    >>> edit.width_after
    2
    >>> Plan(((edit,),)).removed()
    {'zero_out': 1, 'dead': 0, 'constant': 0, 'duplicate': 1}
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Merge:
    """Units that compute `scale * (output of keep)`: their outgoing weights move onto `keep`.

    Args:
        keep: the unit that stays.
        units: the units merged into it.
        scales: for each merged unit, its activation divided by that of `keep`.
    """

    keep: int
    units: tuple
    scales: tuple


@dataclasses.dataclass(frozen=True)
class LayerEdit:
    """What to remove from one hidden layer, by unit index.

    Args:
        layer: name of the hidden Dense layer.
        width: its width when the edit was planned (checked before applying).
        zero_out: units whose outgoing weights are zero: dropped.
        dead: units whose activation is zero on the data: dropped.
        negligible: units of negligible amplitude (condense mode, approximate): dropped.
        constant: units with a constant activation (zero incoming weights, or constant on
            the data): `constant_values` times their outgoing weights join the next bias.
        constant_values: the activation of each constant unit.
        merges: duplicate groups, each merged into one unit.
    """

    layer: str
    width: int
    zero_out: tuple = ()
    dead: tuple = ()
    negligible: tuple = ()
    constant: tuple = ()
    constant_values: tuple = ()
    merges: tuple = ()

    @property
    def removed_units(self):
        """Every unit the edit removes."""
        merged = [unit for merge in self.merges for unit in merge.units]
        return tuple(sorted((*self.zero_out, *self.dead, *self.negligible, *self.constant, *merged)))

    @property
    def kept_units(self):
        """The units that stay, in order."""
        removed = set(self.removed_units)
        return tuple(unit for unit in range(self.width) if unit not in removed)

    @property
    def width_after(self):
        return self.width - len(self.removed_units)

    def removed(self):
        """Units removed, counted by kind."""
        counts = {
            "zero_out": len(self.zero_out),
            "dead": len(self.dead),
            "constant": len(self.constant),
            "duplicate": sum(len(merge.units) for merge in self.merges),
        }
        if self.negligible:
            counts["negligible"] = len(self.negligible)
        return counts


@dataclasses.dataclass(frozen=True)
class Collapse:
    """Composes linearized hidden `layer` into the next layer.

    On the data, unit j of `layer` computes slopes[j] * z_j + intercepts[j], so the two
    affine maps make one: the next layer keeps its name and activation.
    """

    layer: str
    width: int
    slopes: tuple
    intercepts: tuple

    def removed(self):
        return {}


@dataclasses.dataclass(frozen=True)
class Refit:
    """Keeps `kept` units of hidden `layer` and gives the next layer new weights, fitted
    on data to reproduce its former pre-activations (an approximation, not exact)."""

    layer: str
    width: int
    kept: tuple
    next_kernel: list
    next_bias: list

    def removed(self):
        return {"refit": self.width - len(self.kept)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rounds of edits; each round holds at most one `LayerEdit` per hidden layer and is
    planned on the graph the previous rounds produced."""

    rounds: tuple = ()

    def edits(self):
        """Every edit of every round, in order."""
        return [edit for round_ in self.rounds for edit in round_]

    def removed(self, layer=None):
        """Units removed by kind, for one layer (by name) or the whole plan."""
        totals = {"zero_out": 0, "dead": 0, "constant": 0, "duplicate": 0}
        for edit in self.edits():
            if layer in (None, edit.layer):
                for kind, count in edit.removed().items():
                    totals[kind] = totals.get(kind, 0) + count
        return totals

    def duplicate_groups(self, layer):
        """Number of duplicate groups merged in `layer`."""
        return sum(len(edit.merges) for edit in self.edits() if edit.layer == layer and isinstance(edit, LayerEdit))

    def collapsed_layers(self):
        """Names of the hidden layers composed into their successors, in order."""
        return [edit.layer for edit in self.edits() if isinstance(edit, Collapse)]

    def to_dict(self):
        """A JSON-ready description; each edit names its kind."""
        return {"rounds": [[_describe(edit) for edit in round_] for round_ in self.rounds]}


def _describe(edit):
    """An edit as JSON-ready data; refitted weights are summarized by their shape."""
    fields = dataclasses.asdict(edit)
    if isinstance(edit, Refit):
        fields["next_kernel"] = list(np.shape(edit.next_kernel))
        fields["next_bias"] = list(np.shape(edit.next_bias))
    return {"kind": type(edit).__name__, **fields}

"""A plan of edits to hidden units: pure data, printable and serializable to JSON.

Example:
    >>> edit = LayerEdit("h", width=4, zero_out=(3,), merges=(Merge(0, (2,), (1.0,)),))
    >>> edit.width_after
    2
    >>> Plan(((edit,),)).removed()
    {'zero_out': 1, 'constant': 0, 'duplicate': 1}
"""

import dataclasses


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
        constant: units whose incoming weights are zero: sigma(bias) folded into the next bias.
        merges: duplicate groups, each merged into one unit.
    """

    layer: str
    width: int
    zero_out: tuple = ()
    constant: tuple = ()
    merges: tuple = ()

    @property
    def removed_units(self):
        """Every unit the edit removes."""
        merged = [unit for merge in self.merges for unit in merge.units]
        return tuple(sorted((*self.zero_out, *self.constant, *merged)))

    @property
    def width_after(self):
        return self.width - len(self.removed_units)

    def removed(self):
        """Units removed, counted by kind."""
        return {
            "zero_out": len(self.zero_out),
            "constant": len(self.constant),
            "duplicate": sum(len(merge.units) for merge in self.merges),
        }


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
        totals = {"zero_out": 0, "constant": 0, "duplicate": 0}
        for edit in self.edits():
            if layer in (None, edit.layer):
                for kind, count in edit.removed().items():
                    totals[kind] += count
        return totals

    def duplicate_groups(self, layer):
        """Number of duplicate groups merged in `layer`."""
        return sum(len(edit.merges) for edit in self.edits() if edit.layer == layer)

    def to_dict(self):
        """A JSON-ready description."""
        return {"rounds": [[dataclasses.asdict(edit) for edit in round_] for round_ in self.rounds]}

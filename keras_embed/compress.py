"""Exact width compression: analyze, plan, apply, rebuild, verify.

Example:
    >>> pruned, report = prune(model)
    >>> report.to_dict()["layers"]
    [{'name': 'hidden', 'width_before': 48, 'width_after': 16}, ...]
"""

import dataclasses

from keras_embed.analysis import find_redundancy
from keras_embed.build import build_model
from keras_embed.plan import Plan
from keras_embed.read import read_model
from keras_embed.surgery import apply_plan
from keras_embed.verify import assert_outputs_preserved, calibration_inputs


def plan_exact(graph, rtol=1e-6):
    """Plans the removal of every exactly redundant unit.

    Removing units can expose more (a unit feeding only removed units has zero outgoing
    weights afterwards), so rounds repeat until one finds nothing.

    Returns:
        A `Plan`; apply it with `apply_plan(graph, plan)`.
    """
    rounds = []
    while True:
        edits = tuple(edit for edit in find_redundancy(graph, rtol) if edit.removed_units)
        if not edits:
            return Plan(tuple(rounds))
        rounds.append(edits)
        graph = apply_plan(graph, Plan((edits,)))


def analyze(graph, rtol=1e-6):
    """Per-layer redundancy of a `Graph` (from `read_model`); nothing is changed.

    Returns:
        One dict per Dense layer: name, width, zero_out, constant, duplicate_groups,
        duplicates (units merged away) and effective_width (the width after pruning).
    """
    plan = plan_exact(graph, rtol)
    pruned = apply_plan(graph, plan)
    rows = []
    for before, after in zip(graph.layers, pruned.layers):
        removed = plan.removed(before.name)
        rows.append({
            "layer": before.name,
            "width": before.width,
            "zero_out": removed["zero_out"],
            "constant": removed["constant"],
            "duplicate_groups": plan.duplicate_groups(before.name),
            "duplicates": removed["duplicate"],
            "effective_width": after.width,
        })
    return rows


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """What `prune` did, with the figures that prove it."""

    graph_before: object
    graph_after: object
    plan: Plan
    params_before: int
    params_after: int
    max_abs_diff: float
    atol: float
    calibration: str

    def to_dict(self):
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "depth_before": len(self.graph_before.layers),
            "depth_after": len(self.graph_after.layers),
            "layers": [
                {"name": before.name, "width_before": before.width, "width_after": after.width}
                for before, after in zip(self.graph_before.layers, self.graph_after.layers)
            ],
            "removed": self.plan.removed(),
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "verified": self.max_abs_diff <= self.atol,
            "calibration": self.calibration,
            "plan": self.plan.to_dict(),
        }


def prune(model, rtol=1e-6, x=None, atol=None, force=False):
    """Removes exactly redundant hidden units and checks the outputs did not change.

    Args:
        model: a Keras model (a chain of Dense, Activation and Dropout layers).
        rtol: relative tolerance of the weight comparisons (see `find_redundancy`).
        x: calibration inputs; default 1024 seeded standard-normal inputs.
        atol: allowed max abs output difference; default 1e-4 times the output scale.
        force: return the model even when verification fails.

    Returns:
        (pruned model built from stock Keras layers, `PruneReport`). `model` is untouched.

    Raises:
        VerificationError: when outputs differ by more than `atol` and not `force`.
        UnsupportedLayerError: when the model holds an unsupported layer.
    """
    graph = read_model(model)
    plan = plan_exact(graph, rtol)
    pruned_graph = apply_plan(graph, plan)
    pruned = build_model(pruned_graph)
    calibration = "user data"
    if x is None:
        x, calibration = calibration_inputs(model), "1024 seeded standard-normal inputs"
    diff, atol = assert_outputs_preserved(model, pruned, x, atol, raise_error=not force)
    report = PruneReport(
        graph, pruned_graph, plan, model.count_params(), pruned.count_params(), diff, atol, calibration
    )
    return pruned, report

"""Compression that keeps outputs: plan (weights, then data rules), apply, rebuild, verify.

Example:
    >>> pruned, report = prune(model)                  # exact rules from the weights alone
    >>> pruned, report = prune(model, data=x_calib)    # plus dead, constant and linearized on x_calib
    >>> report.to_dict()["collapsed_layers"]
    ['lift_1']
"""

import dataclasses

from keras_embed.analysis import find_redundancy
from keras_embed.build import build_model
from keras_embed.data_rules import find_data_redundancy, layer_regimes, plan_collapses
from keras_embed.linearity import DEFAULT_LIN_TOL
from keras_embed.plan import LayerEdit, Plan
from keras_embed.read import read_model
from keras_embed.stats import collect
from keras_embed.surgery import apply_plan
from keras_embed.verify import assert_outputs_preserved, calibration_inputs


def plan_exact(graph, rtol=1e-6):
    """Plans the removal of every unit that is redundant by its weights alone.

    Removing units can expose more (a unit feeding only removed units has zero outgoing
    weights afterwards), so rounds repeat until one finds nothing.
    """
    rounds = []
    while True:
        edits = tuple(edit for edit in find_redundancy(graph, rtol) if edit.removed_units)
        if not edits:
            return Plan(tuple(rounds))
        rounds.append(edits)
        graph = apply_plan(graph, Plan((edits,)))


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A plan and what it was made from.

    Attributes:
        plan: the `Plan`.
        regimes: `Regimes` of every hidden layer of the original graph, by name.
        skipped: linearized layers not collapsed because the merged layer would be larger.
        with_data: whether the regimes come from data (else only linear activations count).
    """

    plan: Plan
    regimes: dict
    skipped: list
    with_data: bool

    def linear_fraction(self, layer):
        """Fraction of a hidden layer's units in a linear regime; None when unknown."""
        regime = self.regimes.get(layer)
        if regime is None or not (self.with_data or regime.linear.all()):
            return None
        return round(float(regime.linear.mean()), 4)


def _track(regimes, edits):
    """Regimes by layer name after `edits` removed units (the kept units' stay valid)."""
    regimes = dict(regimes)
    for edit in edits:
        if isinstance(edit, LayerEdit):
            regimes[edit.layer] = regimes[edit.layer].subset(edit.kept_units)
    return regimes


def plan_prune(graph, stats=None, rtol=1e-6, lin_tol=DEFAULT_LIN_TOL, allow_growth=False):
    """Plans every removal: weight rules, data rules (with `stats`), collapses, weight rules.

    Weight rules go first because they hold for every input; data rules then catch what
    is redundant on the data only. Without `stats`, only hidden layers with a linear
    activation collapse.
    """
    regimes = layer_regimes(graph, stats, lin_tol, rtol)
    rounds = list(plan_exact(graph, rtol).rounds)
    graph = apply_plan(graph, Plan(tuple(rounds)))
    current = _track(regimes, [edit for round_ in rounds for edit in round_])
    data_edits = find_data_redundancy(graph, current) if stats is not None else ()
    if data_edits:
        rounds.append(data_edits)
        graph = apply_plan(graph, Plan((data_edits,)))
        current = _track(current, data_edits)
    collapses, skipped = plan_collapses(graph, current, allow_growth)
    if collapses:
        rounds.append(collapses)
        graph = apply_plan(graph, Plan((collapses,)))
    return Analysis(Plan(tuple(rounds) + plan_exact(graph, rtol).rounds), regimes, skipped, stats is not None)


def analyze(graph, stats=None, rtol=1e-6, lin_tol=DEFAULT_LIN_TOL, allow_growth=False):
    """Per-layer redundancy of a `Graph` (from `read_model`); nothing is changed.

    Returns:
        One dict per Dense layer: layer, width, zero_out, dead, constant,
        duplicate_groups, duplicates (units merged away), linear_fraction (units in a
        linear regime on the data), collapsed, effective_width (0 when collapsed).
    """
    result = plan_prune(graph, stats, rtol, lin_tol, allow_growth)
    widths = {layer.name: layer.width for layer in apply_plan(graph, result.plan).layers}
    collapsed = set(result.plan.collapsed_layers())
    rows = []
    for layer in graph.layers:
        removed = result.plan.removed(layer.name)
        rows.append({
            "layer": layer.name,
            "width": layer.width,
            "zero_out": removed["zero_out"],
            "dead": removed["dead"],
            "constant": removed["constant"],
            "duplicate_groups": result.plan.duplicate_groups(layer.name),
            "duplicates": removed["duplicate"],
            "linear_fraction": result.linear_fraction(layer.name),
            "collapsed": layer.name in collapsed,
            "effective_width": widths.get(layer.name, 0),
        })
    return rows


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """What `prune` did, with the figures that prove it."""

    graph_before: object
    graph_after: object
    analysis: Analysis
    params_before: int
    params_after: int
    max_abs_diff: float
    atol: float
    calibration: str
    max_abs_diff_validation: float | None = None

    def to_dict(self):
        plan = self.analysis.plan
        widths = {layer.name: layer.width for layer in self.graph_after.layers}
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "depth_before": len(self.graph_before.layers),
            "depth_after": len(self.graph_after.layers),
            "layers": [
                {
                    "name": layer.name,
                    "width_before": layer.width,
                    "width_after": widths.get(layer.name, 0),
                    "linearized": self.analysis.linear_fraction(layer.name),
                }
                for layer in self.graph_before.layers
            ],
            "removed": plan.removed(),
            "collapsed_layers": plan.collapsed_layers(),
            "not_collapsed_would_grow": self.analysis.skipped,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_diff_validation": self.max_abs_diff_validation,
            "atol": self.atol,
            "verified": self.max_abs_diff <= self.atol
            and (self.max_abs_diff_validation is None or self.max_abs_diff_validation <= self.atol),
            "calibration": self.calibration,
            "plan": plan.to_dict(),
        }


def prune(model, rtol=1e-6, data=None, atol=None, force=False, *, validation=None,
          lin_tol=DEFAULT_LIN_TOL, allow_growth=False, batch_size=256, on_batch=None):
    """Removes redundant hidden units and linearized layers, then checks the outputs.

    Args:
        model: a Keras model (a chain of Dense, Activation, Dropout, BatchNormalization).
        rtol: relative tolerance of the weight comparisons (see `find_redundancy`).
        data: calibration inputs (array, dataset or iterable of batches). When given, the
            data rules apply too (dead, constant and linearized on this data) and outputs
            are verified on it; default: weight rules only, verified on 1024 seeded
            standard-normal inputs.
        atol: allowed max abs output difference; default 1e-4 times the output scale.
        force: return the model even when verification fails.
        validation: held-out inputs the outputs must also match on.
        lin_tol: affine-fit residual below which a smooth unit counts as linear.
        allow_growth: collapse linearized layers even when the merged layer is larger.
        batch_size: rows per batch for arrays.
        on_batch: progress callback, called with each batch's sample count.

    Returns:
        (pruned model of stock Keras layers, `PruneReport`). `model` is untouched.

    Raises:
        VerificationError: when outputs differ by more than `atol` and not `force`.
        UnsupportedLayerError: when the model holds an unsupported layer.
    """
    graph = read_model(model)
    stats = None if data is None else collect(graph, data, batch_size, gram=False, on_batch=on_batch)
    analysis = plan_prune(graph, stats, rtol, lin_tol, allow_growth)
    pruned_graph = apply_plan(graph, analysis.plan)
    pruned = build_model(pruned_graph)
    calibration = "user data"
    if data is None:
        data, calibration = calibration_inputs(model), "1024 seeded standard-normal inputs"
    diff, atol = assert_outputs_preserved(model, pruned, data, atol, raise_error=not force, batch_size=batch_size)
    diff_validation = None
    if validation is not None:
        diff_validation, _ = assert_outputs_preserved(model, pruned, validation, atol, not force, batch_size)
    report = PruneReport(graph, pruned_graph, analysis, model.count_params(), pruned.count_params(),
                         diff, atol, calibration, diff_validation)
    return pruned, report

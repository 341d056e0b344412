"""Compression that keeps outputs: plan (weights, then data rules), apply, rebuild, verify.

Example:
    >>> pruned, report = prune(model)                  # exact rules from the weights alone
    >>> pruned, report = prune(model, data=x_calib)    # plus dead, constant and linearized on x_calib
    >>> report.to_dict()["collapsed_layers"]
    ['lift_1']
"""

import dataclasses
import functools
import time

import numpy as np

from keras_embed.analysis import find_redundancy
from keras_embed.build import build_model
from keras_embed.channel_compensate import check_channel_memory, compress_channels
from keras_embed.compensate import compress_widths, search
from keras_embed.condense import plan_condense
from keras_embed.errors import InputError, RuleError, UnsupportedLayerError
from keras_embed.data import require_reusable
from keras_embed.data_rules import find_data_redundancy, layer_regimes, plan_collapses
from keras_embed.linearity import DEFAULT_LIN_TOL
from keras_embed.plan import LayerEdit, Plan
from keras_embed.network import build_network, read_network
from keras_embed.prune_network import NetworkReport, prune_network, reduce_network
from keras_embed.read import read_chain
from keras_embed.rules import measure
from keras_embed.stats import check_gram_memory, collect
from keras_embed.surgery import apply_plan
from keras_embed.verify import assert_outputs_preserved, calibration_inputs, predict

MODES = ("exact", "condense", "data")


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
    """Plans every removal: weight rules, data rules (with `stats`), then collapses and
    weight rules in turn until neither finds anything.

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
    while True:  # a collapse can shrink neighbours, and shrunk neighbours can make a skipped collapse pay
        collapses, skipped = plan_collapses(graph, current, allow_growth)
        if collapses:
            rounds.append(collapses)
            graph = apply_plan(graph, Plan((collapses,)))
        exact = plan_exact(graph, rtol).rounds
        rounds.extend(exact)
        graph = apply_plan(graph, Plan(exact))
        current = _track(current, [edit for round_ in exact for edit in round_])
        if not collapses and not exact:
            return Analysis(Plan(tuple(rounds)), regimes, skipped, stats is not None)


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
    """What `prune` did, with the figures that prove it.

    `checks` holds the figures of the verification: max_abs_diff and atol, and for
    approximate modes the rule and the `rules.measure` figures on the held-out data.
    """

    mode: str
    graph_before: object
    graph_after: object
    analysis: Analysis
    params_before: int
    params_after: int
    calibration: str
    checks: dict
    seconds: float

    @property
    def max_abs_diff(self):
        """Exact mode: max abs output difference on the calibration data."""
        return self.checks.get("max_abs_diff")

    @property
    def atol(self):
        """Exact mode: the tolerance it was checked against."""
        return self.checks.get("atol")

    def to_dict(self):
        plan = self.analysis.plan
        widths = {layer.name: layer.width for layer in self.graph_after.layers}
        return {
            "mode": self.mode,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "depth_before": len(self.graph_before.layers),
            "depth_after": len(self.graph_after.layers),
            "flops_before": self.graph_before.flops,
            "flops_after": self.graph_after.flops,
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
            **self.checks,
            "calibration": self.calibration,
            "seconds": round(self.seconds, 3),
            "plan": plan.to_dict(),
        }


def _approximate_plan(graph, mode, x, rule, judge, cos, batch_size):
    """Exact rounds, then the condense merge or the data-driven refit (as far as `rule`
    allows, each candidate judged by `judge(model, params)`)."""
    exact = plan_exact(graph)
    reduced = apply_plan(graph, exact)
    if mode == "condense":
        extra = plan_condense(reduced, cos)
    else:
        compress = functools.partial(compress_widths, reduced, x, batch_size=batch_size, cache={})
        judge_result = lambda result: judge(build_model(result[0]), result[0].params)  # noqa: E731
        extra = search(compress, rule, judge_result, 1.0 / max(reduced.widths[:-1] or [1]))[1]
    rounds = exact.rounds + ((extra,) if extra else ())
    return Analysis(Plan(rounds), {}, [], False)


def _network_data_reduction(network, x, rule, judge, rtol, lin_tol, allow_growth, batch_size, on_batch):
    """`prune_network.reduce_network` (the exact rules), then the channel refit as far as
    `rule` allows; returns the `Reduction` with the refit network as `after`."""
    check_channel_memory(network)  # before any pass
    reduction = reduce_network(network, x, rtol, lin_tol, allow_growth, batch_size, on_batch)
    reduced = reduction.after
    compress = functools.partial(compress_channels, reduced, x, batch_size=batch_size, grams={})
    judge_result = lambda result: judge(build_network(result[0]), result[0].params)  # noqa: E731
    widest = max((reduced.group_width(group) for group in reduced.editable_groups()), default=1)
    return dataclasses.replace(reduction, after=search(compress, rule, judge_result, 1.0 / widest)[0])


def _held_out(data, labels, validation, validation_labels):
    """The data approximate modes are judged on: the validation data when given, else the calibration data."""
    return (data, labels) if validation is None else (validation, validation_labels)


def _judge(model, data, labels, validation, validation_labels, batch_size):
    """`judge(candidate, params)`: the `rules.measure` figures of a candidate model on `_held_out`."""
    inputs, inputs_labels = _held_out(data, labels, validation, validation_labels)
    reference = predict(model, inputs, batch_size)
    return lambda candidate, params: (measure(reference, predict(candidate, inputs, batch_size), inputs_labels), params)


def _check_rule(rule, reference, pruned, x, labels, batch_size, force):
    """`rules.measure` figures on `x`; raises `RuleError` when `rule` (if any) fails, unless `force`."""
    figures = measure(predict(reference, x, batch_size), predict(pruned, x, batch_size), labels)
    params = pruned.count_params()
    if rule is not None and not rule.holds(figures, params) and not force:
        raise RuleError(f"on the held-out data the compressed model has {rule.describe(figures, params)}; "
                        "nothing was written (relax the rule or pass --force)")
    return figures


def _held_out_checks(rule, model, pruned, data, labels, validation, validation_labels, batch_size, force):
    """The `rules.measure` figures on the validation (else calibration) array, and the rule."""
    checks = {}
    held_out, held_out_labels = _held_out(data, labels, validation, validation_labels)
    if isinstance(held_out, np.ndarray):
        checks.update(_check_rule(rule, model, pruned, held_out, held_out_labels, batch_size, force))
        checks["checked_on"] = "calibration data" if validation is None else "validation data"
    if rule is not None:
        checks["rule"] = {"kind": rule.kind, "value": rule.value}
    return checks


def prune(model, rtol=1e-6, data=None, atol=None, force=False, *, mode="exact", rule=None, labels=None,
          validation=None, validation_labels=None, cos=0.99, lin_tol=DEFAULT_LIN_TOL, allow_growth=False,
          batch_size=256, on_batch=None):
    """Compresses `model` and checks the result.

    Modes:
        exact (default): weight rules, plus the data rules (dead, constant, linearized on
            the data) when `data` is given; outputs must match within `atol` on the
            calibration data (1024 seeded standard-normal inputs without `data`) and on
            `validation`.
        condense: exact rules, then the width paper's cosine merge (`cos`); approximate.
        data: exact rules, then greedy selection and least-squares refit on `data`
            (an array), as far as `rule` allows, measured on `validation` when given
            (else on `data`); approximate.
        For the approximate modes the `rule` (when given) must hold on `validation` (else
        on `data`), or `RuleError` is raised. Keep a test set apart from both.

    Convolutional and branching models (see `network.SUPPORTED`): exact mode goes to
    `prune_network.prune_network`, data mode refits channels (`channel_compensate`);
    condense is for chains only. The report is then a `NetworkReport`.

    Args:
        model: a Keras model (a chain of Dense, Activation, Dropout, BatchNormalization, or
            a network of the layers in `network.SUPPORTED`).
        rtol: relative tolerance of the weight comparisons (see `find_redundancy`).
        data: calibration inputs (array, dataset or iterable of batches; an array in data mode).
        atol: exact mode: allowed max abs output difference; default 1e-4 times the output scale.
        force: return the model even when verification fails.
        mode: "exact", "condense" or "data".
        rule: a `rules.Rule` (required in data mode).
        labels, validation_labels: class labels of `data` and `validation` (for accuracy).
        validation: held-out inputs.
        cos: cosine threshold of condense mode.
        lin_tol: affine-fit residual below which a smooth unit counts as linear.
        allow_growth: collapse linearized layers even when the merged layer is larger.
        batch_size: rows per batch.
        on_batch: progress callback of the statistics pass, called with each batch's size.

    Returns:
        (compressed model of stock Keras layers, `PruneReport`). `model` is untouched.

    Raises:
        VerificationError, RuleError: the result does not pass its check (and not `force`).
        UnsupportedLayerError: the model holds an unsupported layer.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'; choose exact, condense or data")
    require_reusable(data)
    require_reusable(validation)
    graph = read_chain(model)
    if graph is None and mode == "exact":  # a convolutional or branching network
        return prune_network(model, rtol, data, atol, force, validation=validation, lin_tol=lin_tol,
                             allow_growth=allow_growth, batch_size=batch_size, on_batch=on_batch)
    network = read_network(model) if graph is None else None  # raises what is unsupported, if anything
    if network is not None and mode == "condense":
        raise UnsupportedLayerError("--mode condense supports chains of Dense layers only; prune convolutional "
                                    "or branching models with --mode exact or --mode data")
    if mode != "exact":
        _check_approximate_inputs(mode, data, rule, labels, validation, validation_labels)
    judge = _judge(model, data, labels, validation, validation_labels, batch_size) if mode == "data" else None
    if network is not None:
        reduction = _network_data_reduction(network, data, rule, judge, rtol, lin_tol, allow_growth, batch_size, on_batch)
        pruned = build_network(reduction.after)
        checks = _held_out_checks(rule, model, pruned, data, labels, validation, validation_labels, batch_size, force)
        return pruned, NetworkReport(reduction, "user data", checks, time.perf_counter() - start, mode)
    if mode == "exact":
        stats = None if data is None else collect(graph, data, batch_size, gram=False, on_batch=on_batch)
        analysis = plan_prune(graph, stats, rtol, lin_tol, allow_growth)
    else:
        if mode == "data":  # the refit holds one layer's Gram at a time: refuse a too wide layer before any pass
            for layer in graph.layers[:-1]:
                check_gram_memory([layer])
        analysis = _approximate_plan(graph, mode, data, rule, judge, cos, batch_size)
    pruned_graph = apply_plan(graph, analysis.plan)
    pruned = build_model(pruned_graph)
    calibration = "user data"
    if data is None:
        data, calibration = calibration_inputs(model), "1024 seeded standard-normal inputs"
    checks = _exact_checks(model, pruned, data, validation, atol, force, batch_size) if mode == "exact" else {}
    checks.update(_held_out_checks(rule, model, pruned, data, labels, validation, validation_labels, batch_size, force))
    report = PruneReport(mode, graph, pruned_graph, analysis, model.count_params(), pruned.count_params(),
                         calibration, checks, time.perf_counter() - start)
    return pruned, report


def _check_approximate_inputs(mode, data, rule, labels, validation, validation_labels):
    if mode == "data" and (data is None or rule is None):
        raise InputError("--mode data needs calibration data (--data or --dataset) and a stopping rule")
    if rule is not None and rule.needs_labels and (labels is None or (validation is not None and validation_labels is None)):
        raise InputError("--max-accuracy-drop needs labels: y in the calibration and validation .npz files")


def _exact_checks(model, pruned, data, validation, atol, force, batch_size):
    """Max abs output differences on the calibration and validation data, within `atol`."""
    diff, atol = assert_outputs_preserved(model, pruned, data, atol, raise_error=not force, batch_size=batch_size)
    diff_validation = None
    if validation is not None:
        diff_validation = assert_outputs_preserved(model, pruned, validation, atol, not force, batch_size)[0]
    verified = diff <= atol and (diff_validation is None or diff_validation <= atol)
    return {"max_abs_diff": diff, "atol": atol, "max_abs_diff_validation": diff_validation, "verified": verified}

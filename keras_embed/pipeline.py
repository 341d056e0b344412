"""prune, analyze and embed: read, measure, find, plan, apply, rebuild, verify, report.

    model --read--> Graph --(data: one statistics pass)--> plan --apply--> Graph' --build--> model' --verify

Every model the reader takes goes the same way: Dense chains, CNNs and branching graphs.
`prune` plans the exact rules (weights first, then what the data shows: dead and
constant channels, layers linear on it, composed with their readers; rounds repeat until
nothing changes), then, in an approximate mode, the condense merge or the data-driven
refit as far as a stopping rule allows. The `Report` (one schema, docs/report.md) says
what went and proves what stayed.

Example:
    >>> pruned, report = prune(model)                    # exact rules from the weights alone
    >>> pruned, report = prune(model, data=x_calib)      # plus dead, constant, linearized on x_calib
    >>> report.to_dict()["collapsed_layers"]
    ['hidden_lift']
"""

import dataclasses
import functools
import time

import numpy as np

from keras_embed.files.data import check_labels, is_arrays, require_reusable, row_count, split_calibration
from keras_embed.edit.operators import add_null, deepen, editable_layer, widen
from keras_embed.edit.plan import Plan
from keras_embed.edit.surgery import apply_plan, apply_round, follow
from keras_embed.errors import InputError, RuleError, check_number
from keras_embed.find.condense import plan_condense
from keras_embed.find.constants import data_constants
from keras_embed.find.data_rules import plan_collapses
from keras_embed.find.refit import check_refit_memory, compress_groups, search
from keras_embed.find.stats_cache import STATS_CACHE_BUDGET, StatsCache
from keras_embed.find.weight_rules import find_redundancy
from keras_embed.measure.latency import Latency
from keras_embed.measure.regimes import DEFAULT_LIN_TOL, moment_producers, producer_regimes
from keras_embed.measure.statistics import GRAM_BUDGET, collect, producer_requests, source_requests
from keras_embed.model.build import build_model
from keras_embed.model.read import nonfinite_weight, read_model
from keras_embed.stopping import check_reference, class_labels, measure, shortfall
from keras_embed.verify import assert_outputs_preserved, calibration_inputs, predict

MODES = ("exact", "condense", "data")
HOLD_OUT = 0.2  # share of the calibration rows held out to judge an approximate mode without validation data
HOLD_OUT_SEED = 0
LATENCY_MARGIN = 0.05  # the search aims this share below a latency target: the written model is timed again


def statistics(graph, data, batch_size=256, on_batch=None, strategy=None):
    """The one pass for the exact data rules: (regime statistics by producer, value
    statistics by tensor read by a producer), on the replicas of `strategy` when given."""
    regimes, values = producer_requests(graph, moments=moment_producers(graph)), source_requests(graph)
    requests = {**{("z", name): request for name, request in regimes.items()},
                **{("a", name): request for name, request in values.items()}}
    stats = collect(graph, data, requests, batch_size, on_batch, strategy=strategy)
    return ({name: stats[("z", name)] for name in regimes}, {name: stats[("a", name)] for name in values})


def _advance(graph, edits, carried):
    """(the graph `edits` make of `graph`, each dict of `carried` followed through them)."""
    after = apply_round(graph, edits)
    return after, [None if values is None else follow(graph, edits, values, after) for values in carried]


def plan_exact(graph, rtol=1e-6):
    """Plans the removal of every channel redundant by the weights alone, in rounds until
    one finds nothing (removing channels can expose more: a channel feeding only removed
    ones is zero-out afterwards).

    Example:
        >>> apply_plan(graph, plan_exact(graph)).widths
        [16, 12, 10]
    """
    return _exact_rounds(graph, rtol)[0]


def _exact_rounds(graph, rtol=1e-6, known=None, regimes=None):
    """`plan_exact`, carrying `known` data constants (tensor -> values) and `regimes`
    (producer -> `Regimes`) along as channels go; returns (plan, graph after it, known
    after it, regimes after it)."""
    rounds = []
    while True:
        edits = find_redundancy(graph, rtol, known)
        if not edits:
            return Plan(tuple(rounds)), graph, known, regimes
        rounds.append(edits)
        graph, (known, regimes) = _advance(graph, edits, (known, regimes))


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A plan and what it was made from.

    Attributes:
        plan: the `Plan`.
        regimes: `Regimes` of every producer of the original graph, by name.
        skipped: producers linear on the data but not collapsed: merging would grow.
        with_data: whether the regimes come from data (else only affine ones count).
    """

    plan: Plan
    regimes: dict
    skipped: list
    with_data: bool

    def linear_fraction(self, layer):
        """Share of a producer's channels in a linear regime; None when unknown."""
        regime = self.regimes.get(layer)
        if regime is None or not (self.with_data or regime.linear.all()):
            return None
        return round(float(regime.linear.mean()), 4)


def plan_prune(graph, stats=None, rtol=1e-6, lin_tol=DEFAULT_LIN_TOL, allow_growth=False):
    """Plans every exact removal: the rules (with the data constants of `stats`), then
    collapses and rules in turn until neither finds anything (a collapse can shrink
    neighbours, and shrunk neighbours can make a collapse that would grow pay).

    Args:
        stats: (regime statistics, value statistics) from `statistics`, or None.
    """
    regimes = producer_regimes(graph, None if stats is None else stats[0], lin_tol, rtol)
    known = None if stats is None else data_constants(stats[1], rtol)
    plan, current, known, tracked = _exact_rounds(graph, rtol, known, regimes)
    rounds = list(plan.rounds)
    while True:
        collapses, skipped = plan_collapses(current, tracked, allow_growth)
        if collapses:
            rounds.append(collapses)
            current, (known, tracked) = _advance(current, collapses, (known, tracked))
        more, current, known, tracked = _exact_rounds(current, rtol, known, tracked)
        rounds.extend(more.rounds)
        if not collapses and not more.rounds:
            return Analysis(Plan(tuple(rounds)), regimes, skipped, stats is not None)


def _kinds_removed(plan, group):
    removed = plan.removed(group)
    return {kind: removed.get(kind, 0) for kind in ("zero_out", "dead", "constant", "duplicate", "refit")}


def layer_rows(before, after, analysis):
    """One row per producer of `before`: its group, widths before and after, channels removed
    by kind (counted per group: the layers an Add joins share them), duplicate sets merged,
    share linear on the data (None without data), whether it was collapsed, and an attention
    layer's heads before and after (None for other layers)."""
    collapsed = set(analysis.plan.collapsed_layers())
    rows = []
    for node in before.producers:
        group = before.group_of(node.name)
        removed = _kinds_removed(analysis.plan, group)
        rows.append({
            "name": node.name, "kind": node.kind, "group": group, "width_before": node.width,
            "width_after": 0 if node.name in collapsed or node.name not in after.by_name else after.by_name[node.name].width,
            "zero_out": removed["zero_out"], "dead": removed["dead"], "constant": removed["constant"],
            "duplicate_groups": analysis.plan.duplicate_groups(group), "duplicates": removed["duplicate"],
            "refit": removed["refit"],
            "linear_fraction": None if group in before.frozen_groups else analysis.linear_fraction(node.name),
            "collapsed": node.name in collapsed,
            "heads_before": _heads(before, node.name), "heads_after": _heads(after, node.name),
        })
    return rows


def _heads(graph, name):
    """The number of heads of attention layer `name` in `graph` (None for other layers)."""
    node = graph.by_name.get(name)
    return node.config["num_heads"] if node is not None and node.entry.has_heads else None


@dataclasses.dataclass(frozen=True)
class Report:
    """What `prune` did, with the figures that prove it (every key: docs/report.md).

    `before` and `after` are the graphs (after is what was built); the parameter counts
    are the Keras models' (BatchNormalization's statistics included). `checks` holds the
    verification: max_abs_diff and atol (exact mode), the `stopping.measure` figures on the
    held-out data and the rule (approximate modes).
    """

    mode: str
    before: object
    after: object
    analysis: Analysis
    params_before: int
    params_after: int
    calibration: str
    checks: dict
    seconds: float

    def to_dict(self):
        plan = self.analysis.plan
        return {
            "mode": self.mode,
            "params_before": self.params_before, "params_after": self.params_after,
            "depth_before": len(self.before.producers), "depth_after": len(self.after.producers),
            "flops_before": self.before.flops, "flops_after": self.after.flops,
            "layers": layer_rows(self.before, self.after, self.analysis),
            "removed": plan.removed(),
            "collapsed_layers": plan.collapsed_layers(), "not_collapsed_would_grow": self.analysis.skipped,
            **self.checks, "calibration": self.calibration, "seconds": round(self.seconds, 3),
            "plan": plan.to_dict(),
        }


def hold_out(data, labels, share=HOLD_OUT, seed=HOLD_OUT_SEED):
    """((data, labels) to calibrate on, (data, labels) to judge on or None, what the report
    says of it): without validation data, `share` of the calibration rows, seeded, judge an
    approximate mode (arrays only; a stream is judged on its own rows)."""
    if data is None or not is_arrays(data):
        return (data, labels), None, None
    fit, held = split_calibration(data, labels, share, seed)
    if held is None:
        return fit, None, None
    return fit, held, {"share": share, "seed": seed, "rows": row_count(held[0]), "calibration_rows": row_count(fit[0])}


def _figures(model, graph, reference, inputs, labels, classes, confidence, batch_size, latency):
    """`stopping.measure` figures of `model` (built from `graph`) against `reference` outputs on
    `inputs`, with its FLOPs and, given a `Latency`, its milliseconds."""
    figures = measure(reference, predict(model, inputs, batch_size), labels, classes, confidence)
    figures["flops"] = graph.flops
    if latency is not None:
        figures["latency_ms"] = latency.milliseconds(model)
    return figures


def _judge(model, inputs, inputs_labels, batch_size, confidence, latency):
    """`judge(result)`: the `_figures` of a candidate (graph, edits) on `inputs` (with bounds
    at `confidence`), and its params."""
    reference = check_reference(predict(model, inputs, batch_size))  # before the search, not after it
    classes = len(model.outputs) == 1
    return lambda result: (_figures(build_model(result[0]), result[0], reference, inputs, inputs_labels, classes,
                                    confidence, batch_size, latency), result[0].params)


def _held_out_checks(rule, model, pruned, reduced, held_out, batch_size, force, checked_on, latency):
    """The `_figures` of `pruned` (built from `reduced`) on `held_out` (inputs, labels); raises
    `RuleError` when `rule` fails there or an output is NaN or infinite, unless `force`."""
    inputs, labels = held_out
    confidence = None if rule is None else rule.confidence
    reference = predict(model, inputs, batch_size)
    figures = _figures(pruned, reduced, reference, inputs, labels, len(model.outputs) == 1, confidence, batch_size,
                       latency)
    if latency is not None:
        figures.update(latency_ms_before=latency.milliseconds(model), latency_on=dataclasses.asdict(latency))
    problem = shortfall(rule, figures, pruned.count_params())
    if problem is not None and not force:
        raise RuleError(f"on the held-out data the compressed model has {problem}; "
                        "nothing was written (relax the rule or pass --force)")
    needed = None if rule is None else rule.rows_to_certify(figures)
    return {**figures, "checked_on": checked_on, **({"rows_to_certify": needed} if needed is not None else {}),
            **({"rule": _rule_entry(rule)} if rule else {})}


def _warnings(checks, reduced, calibration_rows):
    """What the held-out figures cannot say: measured on the rows the refit was fitted to, or
    on fewer rows than a group keeps channels (a refit of that many can reproduce them)."""
    notes = []
    if checks["checked_on"] == "calibration data":
        notes.append("the figures are measured on the calibration rows the compression was fitted to and say "
                     "little about other inputs; pass --validation (or array data, of which a share is held out)")
    widest = max(((reduced.group_width(group), group) for group in reduced.editable_groups()), default=None)
    if widest is not None and calibration_rows is not None and calibration_rows <= widest[0]:
        notes.append(f"{calibration_rows} calibration rows but group '{widest[1]}' keeps {widest[0]} channels: a "
                     "refit of that many channels can reproduce the rows it is fitted to exactly; give more rows")
    return notes


def _rule_entry(rule):
    """The report's `rule`: kind, value and, where the rule holds for a bound, its confidence."""
    return {"kind": rule.kind, "value": rule.value, **({"confidence": rule.confidence} if rule.bounded else {})}


def _exact_checks(model, pruned, data, validation, atol, force, batch_size):
    """Max abs output differences on the calibration and validation data, within `atol`."""
    diff, atol = assert_outputs_preserved(model, pruned, data, atol, raise_error=not force, batch_size=batch_size)
    diff_validation = None
    if validation is not None:
        diff_validation = assert_outputs_preserved(model, pruned, validation, atol, not force, batch_size)[0]
    verified = diff <= atol and (diff_validation is None or diff_validation <= atol)
    return {"max_abs_diff": diff, "atol": atol, "max_abs_diff_validation": diff_validation, "verified": verified}


def _check_arguments(mode, rule, rtol, atol, lin_tol):
    """Refuses what no mode can use (cos and batch_size are checked where they are used)."""
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'; choose exact, condense or data")
    if mode == "exact" and rule is not None:
        raise ValueError(f"a stopping rule applies to mode='data' or 'condense'; exact mode keeps the outputs "
                         f"within atol. Received: rule={rule!r}")
    check_number("rtol", rtol, low=0)
    check_number("lin_tol", lin_tol, low=0)
    if atol is not None:
        check_number("atol", atol, low=0)


def _checked_labels(labels, data):
    """`labels` checked against the rows of `data` where both are arrays (one label per row)."""
    return check_labels(labels, data) if labels is not None and is_arrays(data) else labels


def _check_approximate_inputs(mode, data, rule, labels, validation, validation_labels, outputs=1):
    if mode == "data" and (data is None or rule is None):
        raise InputError("--mode data needs calibration data (--data or --dataset) and a stopping rule")
    if rule is not None and rule.needs_labels and outputs > 1:
        raise InputError(f"--max-accuracy-drop needs one classification output but the model has {outputs}; "
                         "use --max-output-error, --keep-ratio or --target-params")
    given = [labels] + ([validation_labels] if validation is not None else [])
    if rule is not None and rule.needs_labels and any(y is None or class_labels(y) is None for y in given):
        raise InputError("--max-accuracy-drop needs class labels (integers or one-hot rows): y in the calibration "
                         "and validation .npz files")


def _approximate_round(graph, reduced, mode, data, rule, judge, cos, batch_size, gram_budget, strategy, allocation):
    """The condense merge, or the data-driven refit as far as `rule` allows (each candidate
    judged by `judge`, widths chosen by `allocation`), on `reduced`, the exactly reduced
    `graph` (a keep ratio is of the groups' widths in `graph`)."""
    if mode == "condense":
        return plan_condense(reduced, cos)
    widths = {group: graph.group_width(group) for group in graph.editable_groups()}
    heads = {node.name: node.config["num_heads"] for node in graph.nodes if node.entry.has_heads}
    measured = "flops" if rule.kind in ("target_flops", "target_latency") else "params"
    cache = StatsCache(0 if rule.kind == "keep_ratio" else STATS_CACHE_BUDGET)  # one attempt: nothing to reuse
    compress = functools.partial(compress_groups, reduced, data, measure=measured, batch_size=batch_size, cache=cache,
                                 widths=widths, gram_budget=gram_budget, heads=heads, strategy=strategy)
    widest = max((reduced.group_width(group) for group in reduced.editable_groups()), default=1)
    if rule.kind == "target_latency":  # one timing is noisy: leave room for the final one
        rule = dataclasses.replace(rule, value=rule.value * (1 - LATENCY_MARGIN))
    return search(compress, rule, judge, 1.0 / widest, allocation=allocation)[1]


def _absolute(rule, graph):
    """`rule` with a FLOPs target of at most 1 read as that share of `graph`'s FLOPs."""
    if rule is not None and rule.kind == "target_flops" and rule.value <= 1:
        return dataclasses.replace(rule, value=float(rule.value * graph.flops))
    return rule


def prune(model, rtol=1e-6, data=None, atol=None, force=False, *, mode="exact", rule=None, labels=None,
          validation=None, validation_labels=None, cos=0.99, lin_tol=DEFAULT_LIN_TOL, allow_growth=False,
          batch_size=256, on_batch=None, gram_budget=GRAM_BUDGET, strategy=None, allocation="global",
          hold_out_share=HOLD_OUT, latency=None):
    """Compresses `model` and checks the result.

    Modes:
        exact (default): the weight rules, plus the data rules (dead, constant, linearized
            on the data) when `data` is given; outputs must match within `atol` on the
            calibration data (1024 seeded standard-normal inputs without `data`) and on
            `validation`.
        condense: exact, then the width paper's cosine merge (`cos`); approximate.
        data: exact, then greedy selection and least-squares refit on `data`, as far as
            `rule` allows, with widths chosen across groups (`allocation`); approximate.
        For the approximate modes the `rule` (when given) must hold on `validation`, or
        `RuleError` is raised. Without `validation`, `hold_out_share` of the rows of array
        `data` (seeded) is held out to judge on and the rest calibrates (a stream is judged
        on its own rows, and the report warns). Keep a test set apart from both.

    Args:
        model: a Keras model of the layers `model.registry` knows (chains, CNNs, branches).
        rtol: relative tolerance of the weight comparisons (see `find_redundancy`).
        data: calibration inputs (array, dataset or iterable of batches; an array in data mode; for a
            model of several inputs a dict of arrays by input name).
        atol: exact mode: allowed max abs output difference; default 1e-4 times the output scale.
        force: return the model even when verification fails.
        mode: "exact", "condense" or "data".
        rule: a `stopping.StoppingRule` (required in data mode); a `target_flops` of at
            most 1 is a share of the model's FLOPs.
        labels, validation_labels: class labels of `data` and `validation` (for accuracy).
        validation: held-out inputs.
        cos: cosine threshold of condense mode.
        lin_tol: affine-fit residual below which a smooth channel counts as linear.
        allow_growth: collapse linearized layers even when the merged layer is larger.
        batch_size: rows per batch.
        on_batch: progress callback of the statistics pass, called with each batch's size.
        gram_budget: data mode: bytes one channel group's Gram and cross-product may take.
        strategy: a `tf.distribute.Strategy` whose replicas share every batch of the
            statistics passes (`measure.replicas`); the same result as without, up to
            float64 rounding.
        allocation: "global" (widths from one price on error per parameter, or per FLOP
            for FLOPs and latency targets: `find.allocation`) or "uniform" (one keep ratio
            or tolerance for every group, as before); a keep-ratio rule is uniform.
        hold_out_share: the share of calibration rows held out without `validation` (0: none).
        latency: the `measure.latency.Latency` a `target_latency` rule is measured with
            (default: TFLite, batch 1, one thread).

    Returns:
        (compressed model of stock Keras layers, `Report`). `model` is untouched.

    Raises:
        VerificationError, RuleError: the result does not pass its check (and not `force`).
        UnsupportedLayerError: the model holds an unsupported layer.
    """
    start = time.perf_counter()
    _check_arguments(mode, rule, rtol, atol, lin_tol)
    require_reusable(data)
    require_reusable(validation)
    labels, validation_labels = _checked_labels(labels, data), _checked_labels(validation_labels, validation)
    graph = read_model(model)
    held_out, checked_on, split = (validation, validation_labels), "validation data", None
    if mode != "exact":
        _check_approximate_inputs(mode, data, rule, labels, validation, validation_labels, len(graph.outputs))
        rule = _absolute(rule, graph)
        latency = (latency or Latency()) if rule is not None and rule.kind == "target_latency" else None
        if validation is None:
            (data, labels), held_out, split = hold_out(data, labels, hold_out_share)
            held_out, checked_on = ((data, labels), "calibration data") if held_out is None else (
                held_out, "held-out calibration rows")
    if mode == "data":
        check_refit_memory(graph, gram_budget)  # before any pass: widths only shrink
    stats = None if data is None else statistics(graph, data, batch_size, on_batch, strategy)
    analysis = plan_prune(graph, stats, rtol, lin_tol, allow_growth)
    reduced = apply_plan(graph, analysis.plan)
    if mode != "exact":
        judge = (_judge(model, *held_out, batch_size, rule.confidence, latency) if mode == "data" else None)
        extra = _approximate_round(graph, reduced, mode, data, rule, judge, cos, batch_size, gram_budget, strategy,
                                   allocation)
        analysis = dataclasses.replace(analysis, plan=Plan(analysis.plan.rounds + ((extra,) if extra else ())))
        reduced = apply_round(reduced, extra) if extra else reduced
    pruned = build_model(reduced)
    calibration = "user data"
    if data is None:
        data, calibration = calibration_inputs(model), "1024 seeded standard-normal inputs"
        held_out = (data, None) if held_out[0] is None else held_out
    if mode == "exact":
        checks = _exact_checks(model, pruned, data, validation, atol, force, batch_size)
    else:
        checks = _held_out_checks(rule, model, pruned, reduced, held_out, batch_size, force, checked_on, latency)
        checks.update(**({"held_out": split} if split else {}),
                      warnings=_warnings(checks, reduced, row_count(data) if mode == "data" and is_arrays(data) else None))
    return pruned, Report(mode, graph, reduced, analysis, model.count_params(), pruned.count_params(), calibration,
                          checks, time.perf_counter() - start)


def analyze(model, data=None, rtol=1e-6, lin_tol=DEFAULT_LIN_TOL, allow_growth=False, batch_size=256, on_batch=None,
            strategy=None):
    """Per-producer redundancy of `model` (`layer_rows`, plus effective_width: what `prune`
    keeps, 0 when collapsed); nothing is changed. `strategy` as in `prune`."""
    graph = read_model(model)
    stats = None if data is None else statistics(graph, data, batch_size, on_batch, strategy)
    analysis = plan_prune(graph, stats, rtol, lin_tol, allow_growth)
    rows = layer_rows(graph, apply_plan(graph, analysis.plan), analysis)
    return [{**row, "effective_width": row["width_after"]} for row in rows]


def lower_bounds(graph, layer, data, batch_size=256):
    """Per channel of producer `layer`, the least value its reader sees on `data` (after
    the elementwise layers that follow): the `lower` of `deepen`."""
    node, _ = editable_layer(graph, layer)
    return collect(graph, data, producer_requests(graph, [node]), batch_size)[node.name].a_min


def embed(model, widen_steps=(), null_steps=(), deepen_layers=(), data=None, margin=1.0, atol=None, batch_size=256):
    """Grows `model` by the embeddings: every widen step (layer, unit, alpha), then every
    null step (layer, bias), then every deepen layer (critical lifting on `data`).

    Returns:
        (grown model, dict: layers (name, width_before, width_after: "(new)" for a lift),
        params_before, params_after, max_abs_diff, atol), checked like `prune` output on
        `data` (1024 seeded standard-normal inputs without it).

    Raises:
        ValueError: a step that names no hidden layer or channel, or bad values.
        VerificationError: the outputs changed by more than `atol`.
    """
    graph = before = read_model(model)
    if deepen_layers and data is None:
        raise InputError("--deepen needs calibration data: give --data or --dataset")
    for layer, unit, alpha in widen_steps:
        graph = widen(graph, layer, unit, alpha)
    for layer, bias in null_steps:
        graph = add_null(graph, layer, bias)
    for layer in deepen_layers:
        graph = deepen(graph, layer, lower_bounds(graph, layer, data, batch_size), margin)
    with np.errstate(over="ignore"):  # a weight too large for the model's dtype is named below
        grown = build_model(graph)
    overflow = nonfinite_weight(grown)
    if overflow is not None:
        raise ValueError(f"layer '{overflow[0]}' would get weights too large for its dtype; "
                         "choose a smaller --widen ALPHA or --null BIAS")
    diff, atol = assert_outputs_preserved(model, grown, calibration_inputs(model) if data is None else data, atol,
                                          batch_size=batch_size)
    widths = {node.name: node.width for node in before.producers}
    layers = [{"name": node.name, "width_before": widths.get(node.name, "(new)"), "width_after": node.width,
               "heads_before": _heads(before, node.name), "heads_after": _heads(graph, node.name)}
              for node in graph.producers]
    return grown, {"layers": layers, "params_before": model.count_params(), "params_after": grown.count_params(),
                   "max_abs_diff": diff, "atol": atol}

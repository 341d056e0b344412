"""Data-driven compression with compensation (`prune --mode data`), channel group by group.

Per editable group (not a recurrent layer's units: `Graph.approximable_groups`), in graph
order and through the groups already compressed before it, one streaming pass gathers the
Gram matrix of [a, 1] (a: the group's channels wherever a producer reads them, every
sample, position and occurrence a row) and its cross-product
with the same channels r of the *reference* network (so errors made earlier are
compensated, not compounded). What matters is what the readers see, a R (R: a reader's
rows for the group, one per occurrence and kernel tap), so the fit is weighted by
Q = sum R R^T = L L^T: greedy forward selection (pivoted Cholesky) keeps the channels that
best reproduce r L, ridge least squares gives every reader new rows for them and the
constant part to its bias (no constant where a reader pads with zeros). One map serves
every reader of the group, so a residual stream stays consistent; for a Dense chain it is
exactly the refit of each next layer's pre-activations.

Example:
    >>> compressed, edits = compress_groups(graph, x, tolerance=1e-3)
    >>> compressed.widths
    [37, 10]
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_embed.files.data import batches, check_inputs
from keras_embed.edit.plan import Refit
from keras_embed.find.allocation import channel_cost, count_at_price, head_cost, total
from keras_embed.find.head_refit import check_head_memory, head_refit, head_stats, refittable
from keras_embed.find.least_squares import RegressionStats, refit
from keras_embed.edit.surgery import apply_round
from keras_embed.measure.reduce import as_list, call, input_signature, input_tensors
from keras_embed.measure.replicas import Sharded, scope
from keras_embed.measure.statistics import GRAM_BUDGET, check_gram_memory, group_request, tensors
from keras_embed.model.build import build_model

def _reader_rows(graph, group):
    """Per reader and occurrence, its rows for `group` flattened: (channels, taps * outputs)."""
    blocks = []
    for reader, source in graph.readers_of(group):
        rows = np.moveaxis(reader.entry.kernel(reader), -2, 0)
        blocks += [rows[occurrence].reshape(len(occurrence), -1) for occurrence in graph.positions(source, group)]
    return blocks


def reader_weighting(graph, group):
    """L with L L^T = sum R R^T over `group`'s readers (see module docstring), at most
    (channels, channels)."""
    blocks = _reader_rows(graph, group)
    stacked = np.hstack(blocks) if blocks else np.eye(graph.group_width(group))
    if stacked.shape[1] <= stacked.shape[0]:
        return stacked
    values, vectors = np.linalg.eigh(stacked @ stacked.T)
    return vectors * np.sqrt(np.maximum(values, 0.0))


def fits_constants(graph, group):
    """Whether every reader of `group` can take a constant into its bias (no zero padding)."""
    return not any(reader.entry.reads_zero_padding(reader) for reader, _ in graph.readers_of(group))


def _part_products(current, reference, parts, weighting):
    """Sums over the rows of `parts` ((tensor, positions), ...) of (rows, a^T a, sum a,
    a^T r L, sum r L, ||r L||^2) in float64, a from {name: current tensor}, r from {name:
    reference tensor}, L the `weighting`: per part, never stacked; r^T r never formed (its
    (channels, channels) would be a second Gram)."""
    sums = None
    for name, positions in parts:
        a, r = (tf.cast(tf.gather(tf.reshape(values[name], (-1, values[name].shape[-1])), list(positions), axis=1),
                        tf.float64) for values in (current, reference))
        seen = tf.linalg.matmul(r, weighting)
        products = (tf.cast(tf.shape(a)[0], tf.float64), tf.linalg.matmul(a, a, transpose_a=True),
                    tf.reduce_sum(a, axis=0), tf.linalg.matmul(a, seen, transpose_a=True), tf.reduce_sum(seen, axis=0),
                    tf.reduce_sum(seen * seen))
        sums = products if sums is None else tuple(total + product for total, product in zip(sums, products))
    return sums


def reference_probe(reference):
    """A probe of the reference `Graph` returning every tensor a producer reads; built once,
    each group's pass takes the part it needs (`regression_stats`)."""
    return build_model(reference, outputs=sorted({source for node in reference.producers for source in node.inputs}))


def regression_stats(graph, target, group, data, weighting, batch_size=256, strategy=None):
    """One pass: `group`'s channels in `graph` against the same channels of the reference
    network (`target`: its `reference_probe`; same node names, the group at the same
    width), weighted by `weighting` (L). Both networks run, as far as the group, in one
    traced function that returns only the products the fit needs (rows never reach NumPy),
    on the replicas of `strategy` when given (`measure.replicas`)."""
    request = group_request(graph, group)
    names = tensors({group: request})
    with scope(strategy):
        current = build_model(graph.up_to(names), outputs=names)
    reference = keras.Model(target.inputs, [target.get_layer(name).output for name in names])

    seen_through = tf.constant(weighting, tf.float64)  # captured by the trace, not copied into it

    def products(inputs):
        outputs = [dict(zip(names, as_list(call(model, inputs)))) for model in (current, reference)]
        return _part_products(*outputs, request.a, seen_through), ()

    sharded = Sharded(products, input_signature(current), strategy)
    width = graph.group_width(group)
    gram, cross, energy = np.zeros((width + 1, width + 1)), np.zeros((width + 1, weighting.shape[1])), 0.0
    for batch in batches(data, batch_size):
        batch = check_inputs(batch, graph.inputs)
        (rows, a_a, a_sum, a_seen, seen_sum, seen_energy), _ = sharded(input_tensors(current, batch))
        gram[:-1, :-1] += a_a
        gram[:-1, -1] += a_sum
        gram[-1, :-1] += a_sum
        gram[-1, -1] += rows
        cross[:-1] += a_seen
        cross[-1] += seen_sum
        energy += float(seen_energy)
    return RegressionStats(gram, cross, energy)


def greedy_selection(gram, cross, energy, intercept=True, limit=None):
    """Forward selection of the columns of [a, 1] that best fit the target by least squares.

    With `intercept`, the constant column (last) is taken first; then, one at a time, the
    column whose residual (after projecting out those chosen) reduces the target's residual
    energy most: pivoted Cholesky on `gram`, scored by the fit of `cross`. Without
    `intercept`, `gram` and `cross` hold no constant column and nothing is taken first.
    With `limit`, it stops once that many columns (the constant aside) are chosen: the
    first ones are the same, and each step costs more than the one before.

    Returns:
        (columns in the order chosen, residual energy after the constant (or after nothing,
        without `intercept`) and after each column).
    """
    size = gram.shape[0]
    factor = np.zeros((size, size))
    residual_gram = np.diag(gram).astype(np.float64).copy()
    residual_cross = np.array(cross, dtype=np.float64)
    floor = 1e-12 * np.maximum(np.diag(gram), 1e-300)
    chosen, energies = [], [] if intercept else [max(energy, 0.0)]
    pivot = size - 1 if intercept else _best_pivot(residual_gram, residual_cross, floor, chosen)
    while pivot is not None:
        step = len(chosen)
        column = gram[:, pivot] - factor[:, :step] @ factor[pivot, :step]
        factor[:, step] = column / math.sqrt(residual_gram[pivot])
        projection = residual_cross[pivot] / math.sqrt(residual_gram[pivot])
        residual_cross -= np.outer(factor[:, step], projection)
        residual_gram -= factor[:, step] ** 2
        energy -= float(projection @ projection)
        chosen.append(pivot)
        energies.append(max(energy, 0.0))
        done = limit is not None and len(chosen) - intercept >= limit
        pivot = None if done else _best_pivot(residual_gram, residual_cross, floor, chosen)
    return chosen[1:] if intercept else chosen, energies


def _best_pivot(residual_gram, residual_cross, floor, chosen):
    """The column not yet chosen whose residual explains most of `residual_cross` (None
    when every column left is numerically spanned by those chosen)."""
    usable = residual_gram > floor
    usable[chosen] = False
    if not usable.any():
        return None
    score = np.where(usable, (residual_cross**2).sum(axis=1) / np.where(usable, residual_gram, 1.0), -np.inf)
    return int(np.argmax(score))


def units_to_keep(energies, width, tolerance=None, keep_ratio=None, base=None):
    """How many of `width` channels: `keep_ratio` of `base` (default `width`; at most
    `width`), or the fewest whose residual energy is at most `tolerance` times that of the
    constant fit alone."""
    if keep_ratio is not None:
        return max(1, min(width, math.ceil(keep_ratio * (width if base is None else base))))
    baseline = energies[0]
    for count, energy in enumerate(energies[1:], start=1):
        if energy <= tolerance * baseline:
            return count
    return max(1, len(energies) - 1)


def group_refit(group, width, stats, weighting, intercept, tolerance=None, keep_ratio=None, base=None, price=None,
                share=None):
    """The `Refit` of one group from its `regression_stats` (`base`: the width `keep_ratio`
    is of; `price` and `share`: `allocation.count_at_price`)."""
    gram, cross = (stats.gram, stats.cross) if intercept else (stats.gram[:-1, :-1], stats.cross[:-1])
    count = None if keep_ratio is None else units_to_keep(None, width, keep_ratio=keep_ratio, base=base)
    order, energies = greedy_selection(gram, cross, stats.energy, intercept, limit=count)
    if count is None:
        count = units_to_keep(energies, width, tolerance) if price is None else count_at_price(energies, price, share)
    rest = [channel for channel in range(width) if channel not in order]  # explain nothing (e.g. dead on the data)
    kept = sorted((list(order) + rest)[:count])  # a group keeps at least one channel
    rows, constant = refit(gram, cross, kept, intercept=intercept)
    inverse = np.linalg.pinv(weighting)  # (rank, channels): back from what readers see to channels
    return Refit(group, width, tuple(kept), rows @ inverse, constant @ inverse)


def check_refit_memory(graph, budget=GRAM_BUDGET):
    """Refuses (`InputError`) a group or attention layer whose Gram and cross-product exceed
    `budget` bytes: one is held at a time."""
    check_head_memory(graph, budget)
    for group in graph.approximable_groups():
        width = graph.group_width(group)
        columns = min(width, sum(block.shape[1] for block in _reader_rows(graph, group)) or 1)
        check_gram_memory({group: width}, budget, extra={group: 8 * (width + 1) * columns})


def compress_groups(graph, data, tolerance=None, keep_ratio=None, price=None, measure="params", batch_size=256,
                    cache=None, widths=None, gram_budget=GRAM_BUDGET, heads=None, strategy=None):
    """Compresses every approximable group and the heads of every attention layer of `graph`
    (`find.head_refit`), in graph order.

    Args:
        graph: the reference `Graph`; the result approximates its outputs on `data`.
        data: calibration inputs (array, dataset or iterable of batches).
        tolerance: per group (per attention layer), keep the fewest channels (heads) whose
            refit leaves at most this fraction of what the readers see (centered) unexplained.
        keep_ratio: instead, keep this fraction of each group's channels (of its width in
            `widths`, {group: width}, when given: the original model's, say) and of each
            attention layer's heads (of its count in `heads`, {layer: heads}, when given).
        price: instead, widths chosen across groups and attention layers by one price on
            the unexplained share per share of the model's `measure` ("params" or "flops")
            a channel or head costs (`find.allocation`).
        cache: a mapping reused across calls on the same `graph` and `data` (a dict, or a
            `find.stats_cache.StatsCache` that bounds the memory it holds): a group's
            statistics are gathered once for each choice of channels kept before it (the
            attempts of `search` share most of them).
        gram_budget: bytes one group's Gram and cross-product may take (see `check_refit_memory`).
        strategy: a `tf.distribute.Strategy` whose replicas share each batch of every pass.

    Returns:
        (compressed `Graph`, tuple of `Refit` and `HeadRefit` edits).

    Raises:
        InputError: a group whose statistics exceed `gram_budget` (before any pass).
    """
    if sum(knob is not None for knob in (tolerance, keep_ratio, price)) != 1:
        raise ValueError("give exactly one of tolerance, keep_ratio and price")
    check_refit_memory(graph, gram_budget)
    cache = {} if cache is None else cache
    current, edits = graph, []
    for kind, name in _units(graph):
        key = (kind, name) + tuple((getattr(edit, "group", None) or edit.layer, edit.kept) for edit in edits)
        if kind == "heads":
            stats = cache.get(key)
            if stats is None:
                if ("target", name) not in cache:
                    with scope(strategy):
                        cache["target", name] = build_model(graph.up_to([name]), outputs=[name])
                stats = cache[key] = head_stats(current, cache["target", name], name, data, batch_size, strategy)
            node = current.by_name[name]
            share = None if price is None else head_cost(node, measure) / total(graph, measure)
            edit = head_refit(current, node, stats, tolerance, keep_ratio, (heads or {}).get(name), price, share)
        else:
            weighting = reader_weighting(current, name)
            stats = cache.get(key)
            if stats is None:
                if "reference" not in cache:
                    with scope(strategy):
                        cache["reference"] = reference_probe(graph)
                stats = cache[key] = regression_stats(current, cache["reference"], name, data, weighting, batch_size,
                                                      strategy)
            share = None if price is None else channel_cost(current, name, measure) / total(graph, measure)
            edit = group_refit(name, graph.group_width(name), stats, weighting, fits_constants(current, name),
                               tolerance, keep_ratio, (widths or {}).get(name), price, share)
        if edit is not None:
            current = apply_round(current, (edit,))
            edits.append(edit)
    return current, tuple(edits)


def _units(graph):
    """("heads", attention layer) and ("group", approximable group read by a producer), in the
    order of their first producer."""
    editable, units = set(graph.approximable_groups()), []
    for node in graph.producers:
        if refittable(node):
            units.append(("heads", node.name))
        group = graph.group_of(node.name)
        if group in editable and graph.readers_of(group):
            editable.discard(group)
            units.append(("group", group))
    return units


def _largest(attempt, low, high, steps):
    """Bisection for the largest knob in [low, high] whose attempt meets the rule.

    `attempt(knob)` returns (meets rule, result). Returns the result of the largest knob
    found to meet it, or of `low` when none does (the caller's check then fails honestly).
    """
    meets, result = attempt(high)
    if meets:
        return result
    best = None
    for _ in range(steps):
        middle = (low + high) / 2
        meets, candidate = attempt(middle)
        if meets:
            low, best = middle, candidate
        else:
            high = middle
    return best if best is not None else attempt(low)[1]


TARGETS = ("target_params", "target_flops", "target_latency")
PRICES = (-8.0, 6.0)  # log10 of the prices `search` tries: from keeping nearly all to keeping one channel a group
ALLOCATIONS = ("global", "uniform")


def search(compress, rule, judge, narrowest, steps=10, allocation="global"):
    """The compression that meets `rule` on the data `judge` measures on.

    keep_ratio applies directly. Under the others, `allocation` "global" bisects the price
    of `find.allocation` (log scale): the smallest price that meets a target (params,
    FLOPs, latency), the largest that keeps an accuracy or output-error budget; "uniform"
    bisects one keep ratio for every group (targets; from `narrowest` to 1) or one
    per-group tolerance (budgets; log scale, 1e-8 to 1).

    Args:
        compress: `compress(tolerance=..., keep_ratio=..., price=...)` -> a result, e.g.
            `functools.partial(compress_groups, graph, x)`.
        judge: maps a result to (figures, params) for `rule.holds`.
        narrowest: the smallest keep ratio worth trying (one channel of the widest group).

    Returns:
        the result of `compress` for the largest compression found to meet `rule`; when none
        does, of the smallest compression (the caller's check then fails honestly), or under
        a latency target the fastest candidate measured: below a few channels a layer a
        runtime's time no longer falls with the width.
    """
    if rule.kind == "keep_ratio":
        return compress(keep_ratio=rule.value)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}. Received: {allocation!r}")
    target = rule.kind in TARGETS
    tried = []  # (figures, meets, result) of every attempt

    def attempt(knob):
        if allocation == "global":
            result = compress(price=10.0 ** (-knob if target else knob))
        else:
            result = compress(keep_ratio=knob) if target else compress(tolerance=10.0**knob)
        figures, params = judge(result)
        tried.append((figures, rule.holds(figures, params), result))
        return tried[-1][1], result

    if allocation == "uniform":
        found = _largest(attempt, narrowest, 1.0, steps) if target else _largest(attempt, -8.0, 0.0, steps)
    else:
        low, high = PRICES
        found = _largest(attempt, -high, -low, steps) if target else _largest(attempt, low, high, steps)
    if rule.kind == "target_latency" and not any(meets for _, meets, _ in tried):
        return min(tried, key=lambda entry: entry[0]["latency_ms"])[2]
    return found

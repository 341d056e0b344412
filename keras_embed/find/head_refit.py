"""Data-driven removal of attention heads (`prune --mode data`): keep the heads that best
reproduce the reference layer's output, and refit the output projection by least squares.

A MultiHeadAttention layer computes y = sum_h c_h W_o[h] + b_o, where c_h is head h's
context softmax(q_h k_h^T / sqrt(key_dim)) v_h (rows: every sample and query position).
One pass gathers the Gram matrix of [c, 1] (c: every head's context side by side) and its
cross-product with the *reference* network's output of the same layer, so errors made
before the layer are compensated, not compounded. Heads are chosen greedily, a whole head
(its value_dim columns) at a time, by what the refit leaves unexplained; ridge least
squares gives the kept heads' output rows and the bias. This is the retraining-free
"rearrange and refit" of Kwon et al. (NeurIPS 2022), with the reference network's output
as the target. Without masks (the reader refuses them) the layer's inputs determine every
context, so the pass computes them from the layer's weights in float64.

Example:
    >>> stats = head_stats(graph, build_model(graph, outputs=["attention"]), "attention", x)
    >>> head_refit(graph, graph.by_name["attention"], stats, keep_ratio=0.5).kept
    (0, 3)
"""

import math

import numpy as np
import tensorflow as tf

from keras_embed.edit.heads import computes_wrongly, head_weights
from keras_embed.edit.plan import HeadRefit
from keras_embed.files.data import batches, check_inputs
from keras_embed.find.allocation import count_at_price
from keras_embed.find.least_squares import RegressionStats, refit
from keras_embed.measure.reduce import as_list, call, input_signature, input_tensors
from keras_embed.measure.replicas import Sharded, scope
from keras_embed.measure.statistics import check_gram_memory
from keras_embed.model.build import build_model


def refittable(node):
    """Whether the heads of `node` can be refitted: MultiHeadAttention over the one
    sequence axis of 3-D inputs (the default attention axes)."""
    return (node.entry.has_heads and len(node.shape) == 2
            and node.config.get("attention_axes") in (None, [1], (1,), 1))


def _sizes(node):
    """(heads, value_dim, outputs) of `node`."""
    return head_weights(node)["output"].shape


def check_head_memory(graph, budget):
    """Refuses (`InputError`) a layer whose head Gram and cross-product exceed `budget` bytes."""
    for node in filter(refittable, graph.nodes):
        heads, value_dim, outputs = _sizes(node)
        check_gram_memory({node.name: heads * value_dim}, budget, extra={node.name: 8 * (heads * value_dim + 1) * outputs})


def _allowed(masks, queries, keys, causal):
    """(batch, 1, queries, keys) float64: 1 where a query may attend to a key, as Keras'
    MultiHeadAttention decides from the masks of its query, value and key (None: none), its
    attention mask (batch, queries, keys) and `use_causal_mask`; None when every pair may."""
    allowed = None
    for mask, axis in zip(masks, (-1, -2, -2, None)):
        if mask is not None:
            mask = tf.cast(tf.cast(mask, tf.bool), tf.float64)
            mask = mask if axis is None else tf.expand_dims(mask, axis)
            allowed = mask if allowed is None else allowed * mask
    if causal:
        lower = tf.linalg.band_part(tf.ones((queries, keys), tf.float64), -1, 0)
        allowed = lower[None] if allowed is None else allowed * lower
    return None if allowed is None else allowed[:, None]


def contexts(parts, query, value, key, causal=False, masks=(None, None, None, None)):
    """Every head's context side by side, (rows, heads * value_dim) float64, from the
    layer's weights `parts` (`heads.head_weights`) and its (batch, positions, channels) inputs,
    with the (batch, positions) masks Keras hands it with the query, value and key (None:
    none; the key's is ignored when the key is the value), its attention mask (batch,
    queries, keys) and `causal` for `use_causal_mask`."""

    def project(name, inputs):
        projected = tf.einsum("btd,dhk->bthk", tf.cast(inputs, tf.float64), tf.constant(parts[name], tf.float64))
        return projected + parts[f"{name}_bias"] if f"{name}_bias" in parts else projected

    q, k, v = project("query", query), project("key", key), project("value", value)
    scores = tf.einsum("bthk,bshk->bhts", q, k) / math.sqrt(parts["query"].shape[-1])
    allowed = _allowed(masks, tf.shape(query)[1], tf.shape(value)[1], causal)
    if allowed is not None:  # Keras' masked softmax: a large negative number where not allowed
        scores = tf.where(allowed > 0, scores, tf.constant(-1e9, tf.float64))
    context = tf.einsum("bhts,bshv->bthv", tf.nn.softmax(scores, axis=-1), v)
    return tf.reshape(context, (-1, context.shape[2] * context.shape[3]))


def head_stats(graph, target, layer, data, batch_size=256, strategy=None):
    """One pass: the contexts of MultiHeadAttention `layer` in `graph` against `target`, a
    model of the same inputs returning the reference network's output of that layer (on
    the replicas of `strategy` when given)."""
    node = graph.by_name[layer]
    sources = list(dict.fromkeys(node.inputs))
    names = sources + [f"{source}/mask" for source in sources]
    with scope(strategy):
        current = build_model(graph.up_to(sources), outputs=names)
    parts, (query, value, key, attention_mask) = head_weights(node), node.entry.attention_inputs(node)

    def products(inputs):
        values = dict(zip(names, as_list(call(current, inputs))))
        masks = (values[f"{query}/mask"], values[f"{value}/mask"], None if key == value else values[f"{key}/mask"],
                 None if attention_mask is None else values[attention_mask])
        c = contexts(parts, values[query], values[value], values[key], node.config.get("use_causal_mask", False), masks)
        y = tf.cast(tf.reshape(call(target, inputs), (-1, _sizes(node)[2])), tf.float64)
        a = tf.concat([c, tf.ones((tf.shape(c)[0], 1), tf.float64)], axis=1)
        return (tf.linalg.matmul(a, a, transpose_a=True), tf.linalg.matmul(a, y, transpose_a=True), tf.reduce_sum(y * y)), ()

    sharded = Sharded(products, input_signature(current), strategy)
    gram, cross, energy = 0.0, 0.0, 0.0
    for batch in batches(data, batch_size):
        batch = check_inputs(batch, graph.inputs)
        sums, _ = sharded(input_tensors(current, batch))
        gram, cross, energy = gram + sums[0], cross + sums[1], energy + float(sums[2])
    return RegressionStats(gram, cross, energy)


def _columns(heads, value_dim):
    """The columns of [c, 1] that hold `heads`' contexts."""
    return [column for head in heads for column in range(head * value_dim, (head + 1) * value_dim)]


def _unexplained(stats, columns):
    """What the least-squares fit on `columns` of [c, 1] leaves of the target's energy."""
    if not columns:
        return stats.energy
    rows, _ = refit(stats.gram, stats.cross, columns, intercept=False)
    return stats.energy - float(np.sum(stats.cross[columns] * rows))


def select_heads(stats, heads, value_dim, intercept, limit):
    """Greedy forward selection of whole heads: returns (heads in the order chosen, the
    unexplained energy after the constant alone (or nothing) and after each head)."""
    base = [stats.gram.shape[0] - 1] if intercept else []
    chosen, energies = [], [_unexplained(stats, base)]
    while len(chosen) < limit:
        scores = {head: _unexplained(stats, base + _columns(chosen + [head], value_dim))
                  for head in range(heads) if head not in chosen}
        best = min(scores, key=scores.get)
        chosen.append(best)
        energies.append(scores[best])
    return chosen, energies


def head_refit(graph, node, stats, tolerance=None, keep_ratio=None, base=None, price=None, share=None):
    """The `HeadRefit` of `node` from its `head_stats`, keeping `keep_ratio` of `base` heads
    (default: its own), the fewest that leave at most `tolerance` of what the constant fit
    leaves unexplained, or the count at `price` (`allocation.count_at_price`, `share`: one
    head's); None when every head stays (never a count Keras computes wrongly:
    `heads.computes_wrongly`)."""
    heads, value_dim, _ = _sizes(node)
    intercept = "output_bias" in head_weights(node)
    if keep_ratio is not None:
        count = max(1, min(heads, math.ceil(keep_ratio * (base or heads))))
        order, energies = select_heads(stats, heads, value_dim, intercept, count)
    else:
        order, energies = select_heads(stats, heads, value_dim, intercept, heads)
        count = count_at_price(energies, price, share) if price is not None else next(
            (count for count, energy in enumerate(energies[1:], start=1) if energy <= tolerance * energies[0]), heads)
    while count < heads and computes_wrongly(graph, node, count):
        count += 1
    if count >= heads:
        return None
    if len(order) < count:
        order, _ = select_heads(stats, heads, value_dim, intercept, count)
    kept = sorted(order[:count])
    columns = _columns(kept, value_dim)
    rows, _ = refit(stats.gram, stats.cross, columns + ([stats.gram.shape[0] - 1] if intercept else []),
                           intercept=False)
    output = rows[:len(columns)].reshape(count, value_dim, -1)
    return HeadRefit(node.name, heads, tuple(kept), output, rows[len(columns)] if intercept else None)

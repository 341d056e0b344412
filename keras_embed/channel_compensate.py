"""Data-driven channel compression with compensation (`prune --mode data` on networks).

Group by group, in graph order, through the already compressed groups before it: one
streaming pass gathers the Gram matrix of [a, 1], a being the group's channels in every
tensor a Dense or Conv2D layer reads them from (samples, positions and occurrences
stacked). Greedy selection (`compensate.greedy_selection`) picks the channels that best
reconstruct all of the group's channels by least squares; each removed channel's reader
rows are spread over the kept channels (the `ChannelMap` mix) and its constant part is
folded into the readers' biases. A reader that pads with zeros would see that constant
where the padding is, so a group with such a reader is fitted without one.

The chain version (`compensate`) refits the next layer's pre-activations; here the
channels themselves are reconstructed, so one map serves every reader of a group (a
residual stream has many).

Example:
    >>> smaller, maps = compress_channels(network, x, tolerance=1e-3)
    >>> {group: len(channel_map.keep) for group, channel_map in maps.items()}
    {'stem': 6, 'head': 9}
"""

import numpy as np

from keras_embed.channel_rules import folds_constants, readers_of
from keras_embed.channel_surgery import ChannelMap, apply_maps
from keras_embed.compensate import greedy_selection, refit, units_to_keep
from keras_embed.data import batches, check_inputs
from keras_embed.network import build_network, probe_outputs
from keras_embed.stats import LayerStats, check_gram_memory, one_blas_thread


def channel_gram(network, group, data, batch_size=256):
    """Gram matrix of [a, 1] over the data, a the channels of `group` in every tensor its
    Dense/Conv2D readers read (one row per sample, position and occurrence)."""
    sources = sorted({source for _, source in readers_of(network, group)})
    probe = build_network(network, outputs=sources)
    width = network.group_width(group)
    stats = LayerStats(width, np.zeros((width + 1, width + 1)))
    with one_blas_thread():
        for batch in batches(data, batch_size):
            outputs = probe_outputs(probe, check_inputs(batch, probe))
            for source, output in zip(sources, outputs):
                flat = output.reshape(-1, output.shape[-1])
                for occurrence in network.positions(source, group):
                    stats.update(flat[:, occurrence], flat[:, occurrence])
    return stats.gram


def group_map(gram, intercept, tolerance=None, keep_ratio=None):
    """The `ChannelMap` keeping the channels that reconstruct all of them (see
    `compensate.units_to_keep` for `tolerance` and `keep_ratio`); at least one is kept."""
    width = gram.shape[0] - 1
    fitted = gram if intercept else gram[:-1, :-1]
    order, energies = greedy_selection(fitted, fitted[:, :width], float(np.trace(gram[:-1, :-1])), intercept)
    count = units_to_keep(energies, width, tolerance, keep_ratio)
    rest = [channel for channel in range(width) if channel not in order]  # explain nothing: zero on the data
    keep = np.array(sorted((list(order) + rest)[:count]), dtype=int)
    kernel, bias = refit(gram, gram[:, :width], keep, intercept=intercept)
    mix, shift = kernel, bias.copy()
    mix[:, keep], shift[keep] = np.eye(len(keep)), 0.0  # a kept channel reconstructs itself exactly
    return ChannelMap(keep, mix, shift)


def check_channel_memory(network):
    """Refuses (`InputError`) a group whose Gram matrix exceeds `stats.GRAM_BUDGET`: one
    is held at a time."""
    for group in network.editable_groups():
        check_gram_memory(network.spaces(group)[:1])


def compress_channels(network, data, tolerance=None, keep_ratio=None, batch_size=256, grams=None):
    """Compresses every editable group of `network`, in graph order.

    Args:
        network: the `Network` to compress.
        data: calibration inputs (array, dataset or iterable of batches).
        tolerance: per group, keep the fewest channels whose reconstruction leaves at
            most this fraction of the group's (centered) energy unexplained.
        keep_ratio: instead, keep this fraction of each group's channels.
        grams: a dict reused across calls on the same `network` and `data`: a group's
            Gram matrix is computed once for each choice of channels kept before it (the
            attempts of `compensate.search` share most of them).

    Returns:
        (compressed `Network`, {group: `ChannelMap`}).

    Raises:
        InputError: a group whose Gram matrix exceeds `stats.GRAM_BUDGET` (before any pass).
    """
    if (tolerance is None) == (keep_ratio is None):
        raise ValueError("give exactly one of tolerance and keep_ratio")
    check_channel_memory(network)
    grams = {} if grams is None else grams
    maps = {}
    for group in network.editable_groups():
        readers = readers_of(network, group)
        if not readers:
            continue
        intercept = all(folds_constants(reader) for reader, _ in readers)
        prefix = (group,) + tuple((name, tuple(channel_map.keep)) for name, channel_map in maps.items())
        if prefix not in grams:
            grams[prefix] = channel_gram(network, group, data, batch_size)
        maps[group] = group_map(grams[prefix], intercept, tolerance, keep_ratio)
        network = apply_maps(network, {group: maps[group]})
    return network, maps

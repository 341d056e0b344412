"""The bounded cache of `compress_groups`' statistics (`find.stats_cache`)."""

import keras
import numpy as np

from builders import make_mlp
from keras_embed import read_model
from keras_embed.find.least_squares import RegressionStats
from keras_embed.find.refit import compress_groups
from keras_embed.find.stats_cache import StatsCache


def _stats(width):
    return RegressionStats(np.zeros((width + 1, width + 1)), np.zeros((width + 1, width)), 0.0)


def _bytes(width):
    return 8 * ((width + 1) ** 2 + (width + 1) * width)


def test_the_entries_after_the_longest_prefix_go_first_and_models_stay():
    cache = StatsCache(budget=3 * _bytes(10))
    cache["reference"] = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    cache["group", "a"] = _stats(10)
    cache["group", "b", ("a", (0, 1))] = _stats(10)
    cache["group", "a2"] = _stats(10)
    assert cache.held == 3 * _bytes(10)
    cache["group", "c", ("a", (0, 1)), ("b", (2,))] = _stats(10)  # the longest prefix: dropped at once
    assert ("group", "c", ("a", (0, 1)), ("b", (2,))) not in cache
    cache["group", "d"] = _stats(10)  # no prefix: the one after a prefix makes room
    assert set(cache) == {"reference", ("group", "a"), ("group", "a2"), ("group", "d")}
    assert cache.held == 3 * _bytes(10)


def test_equal_prefixes_drop_the_oldest_and_a_key_set_again_is_counted_once():
    cache = StatsCache(budget=2 * _bytes(4))
    for name in ("a", "b", "a", "c"):
        cache["group", name] = _stats(4)
    assert list(cache) == [("group", "a"), ("group", "c")] and cache.held == 2 * _bytes(4)
    del cache["group", "a"]
    assert cache.held == _bytes(4) and len(cache) == 1


def test_compression_through_a_cache_that_keeps_nothing_equals_the_one_through_a_dict():
    model = make_mlp((12, 9, 3), inputs=6, seed=0)
    graph = read_model(model)
    x = np.random.default_rng(0).standard_normal((300, 6)).astype("float32")
    kept, kept_edits = compress_groups(graph, x, keep_ratio=0.5, cache={})
    bounded = StatsCache(budget=0)
    dropped, dropped_edits = compress_groups(graph, x, keep_ratio=0.5, cache=bounded)
    assert bounded.held == 0 and list(bounded) == ["reference"]
    assert [edit.kept for edit in kept_edits] == [edit.kept for edit in dropped_edits]
    for node in kept.nodes:
        for weight, other in zip(node.weights, dropped.by_name[node.name].weights):
            np.testing.assert_array_equal(weight, other)

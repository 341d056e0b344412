"""The statistics passes on a `tf.distribute` strategy against the one-device pass, in a
process of its own: logical devices and a multi-worker strategy must be set up before
TensorFlow starts, so `test_distributed.py` runs this file as a script.

    python tests/distributed_pass.py 4 OUT.json float64 float32         # on 4 logical CPU devices
    TF_CONFIG='{...}' python tests/distributed_pass.py worker OUT.json float64   # one of the local workers

(One strategy per process: two MirroredStrategy objects in one process use the same
collective group keys.)

OUT.json gets, per model (float64 ones, where the forward pass is as exact as the
accumulation, and float32 ones, whose forward pass rounds differently on a replica's
shorter batch): the keys compared, the largest difference of any statistic relative to
its scale, whether the models pruned in data mode have the same shapes, and their largest
output difference relative to the outputs' scale (not their weights: where two choices of
units fit almost equally well, rounding may pick the other one, to the same function).
"""

import json
import sys

import numpy as np
import tensorflow as tf

BATCH = 33  # 101 rows: batches of 33, 33, 33 and 2, the last fewer rows than replicas (run on one device)


def _strategy(kind):
    if kind == "worker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # before any other TensorFlow op
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(kind))
    return tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(int(kind))])


def _models(dtype):
    """A CNN with BatchNormalization and a transformer block, of `dtype` weights and
    computations, each with 101 input rows."""
    import keras

    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy(dtype)
    image = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(6, 3, padding="same")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(5, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    cnn = keras.Model(image, keras.layers.Dense(3)(x), name=f"cnn_{dtype}")
    tokens = keras.Input((6, 8))
    x = keras.layers.MultiHeadAttention(2, 4)(tokens, tokens)
    x = keras.layers.LayerNormalization()(keras.layers.Add()([tokens, x]))
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dense(8)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    transformer = keras.Model(tokens, keras.layers.Dense(3)(x), name=f"transformer_{dtype}")
    keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(0)
    return {model.name: (model, rng.standard_normal((101, *model.input_shape[1:])).astype(dtype))
            for model in (cnn, transformer)}


def _passes(model, x, strategy):
    """{name: array} of every statistic the exact rules and the probe gather on `x`."""
    from keras_embed.find.probe import probe_requests
    from keras_embed.measure.statistics import collect
    from keras_embed.model.read import read_model
    from keras_embed.pipeline import statistics

    graph = read_model(model)
    regimes, values = statistics(graph, x, BATCH, strategy=strategy)
    probed = collect(graph, x, probe_requests(graph), BATCH, strategy=strategy)
    found = {}
    for prefix, stats in (("regime", regimes), ("value", values), ("probe", probed)):
        for key, layer in stats.items():
            for field in ("count", "z_min", "z_max", "a_min", "a_max", "positive", "z_mean", "a_mean",
                          "z_m2", "a_m2", "za_m2", "gram"):
                value = getattr(layer, field)
                if value is not None:
                    found[f"{prefix}/{key}/{field}"] = np.asarray(value, dtype=np.float64)
    return found


def _pruned(model, x, strategy):
    """(weight shapes, outputs on `x`) of `model` pruned in data mode to half its widths."""
    from keras_embed.pipeline import prune
    from keras_embed.stopping import StoppingRule

    pruned, _ = prune(model, data=x, mode="data", rule=StoppingRule("keep_ratio", 0.5), batch_size=BATCH,
                      strategy=strategy)
    return [weight.shape for weight in pruned.get_weights()], pruned.predict(x, verbose=0)


def _largest_difference(reference, candidate):
    """The largest |difference| of same-named arrays relative to the reference's scale (NaN where both are NaN)."""
    worst = 0.0
    for name, expected in reference.items():
        got = candidate[name]
        if expected.shape != got.shape or not np.array_equal(np.isnan(expected), np.isnan(got)):
            return float("inf")
        finite = np.isfinite(expected)
        if not np.array_equal(expected[~finite], got[~finite], equal_nan=True):
            return float("inf")
        scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-30)
        worst = max(worst, float(np.abs(expected[finite] - got[finite]).max(initial=0.0)) / scale)
    return worst


def main(kind, out, *dtypes):
    strategy, results = _strategy(kind), {}
    for name, (model, x) in {name: pair for dtype in dtypes for name, pair in _models(dtype).items()}.items():
        alone, shared = _passes(model, x, None), _passes(model, x, strategy)
        (shapes, outputs), (shared_shapes, shared_outputs) = _pruned(model, x, None), _pruned(model, x, strategy)
        results[name] = {
            "replicas": strategy.num_replicas_in_sync,
            "keys": len(alone) if sorted(alone) == sorted(shared) else 0,
            "statistics": _largest_difference(alone, shared),
            "pruned_shapes": shapes == shared_shapes,
            "pruned_outputs": _largest_difference({"y": outputs}, {"y": shared_outputs}),
        }
    with open(out, "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])

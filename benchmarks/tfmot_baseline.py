"""The tfmot row of benchmarks/bench_compression.py, run in its own process.

tensorflow-model-optimization only wraps tf_keras (Keras 2) models, and importing it sets
TF_USE_LEGACY_KERAS=1 for the whole process, so the benchmark never imports it: it starts
this script instead.

    python benchmarks/tfmot_baseline.py WORKDIR

WORKDIR/tfmot_input.npz holds the original network (k0, b0, k1, b1, ... and `activations`),
x_train, y_train, x_test and the settings (target_nonzeros, epochs, batch_size,
learning_rate, seed). The script rebuilds the network as a tf_keras Sequential model with
the same weights, wraps it in `prune_low_magnitude` with `ConstantSparsity` (every kernel at
the same sparsity, chosen so the kernels keep `target_nonzeros` weights in all; biases are
not pruned) and trains with the `UpdatePruningStep` callback, which is what applies the
masks: tfmot has no way to prune without a training loop. The schedule prunes once, at the first
training step (begin_step 0, end_step 1, frequency 1: one-shot magnitude pruning), and the
masks stay fixed afterwards. Two variants:

    masks_only  one Adam step at learning rate 0: the masks are applied, no weight moves
                (plain unstructured magnitude pruning, no fine-tuning)
    finetuned   `epochs` epochs of Adam (the benchmark's fine-tuning recipe)

Each is stripped (`strip_pruning`), converted with `tf.lite.TFLiteConverter.from_keras_model`
into WORKDIR/tfmot_VARIANT.tflite, and its weights are written to WORKDIR/tfmot_VARIANT.npz.
One JSON object goes to stdout: per variant the sparsity, nonzero counts, test-set
predictions (argmax), seconds (wrap + train + strip, not the imports), the TFLite path and
sizes; plus the versions used.
"""

import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported: tf.keras is tf_keras here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402


def original_model(arrays):
    """The benchmark's network as a tf_keras Sequential model with the given weights."""
    activations = [str(name) for name in arrays["activations"]]
    kernels = [arrays[f"k{index}"] for index in range(len(activations))]
    model = tf_keras.Sequential([tf_keras.Input((kernels[0].shape[0],))] + [
        tf_keras.layers.Dense(kernel.shape[1], activation=activation)
        for kernel, activation in zip(kernels, activations)
    ])
    for layer, index in zip(model.layers, range(len(activations))):
        layer.set_weights([arrays[f"k{index}"], arrays[f"b{index}"]])
    return model


def pruned(arrays, sparsity, epochs, learning_rate, batch_size, seed):
    """Wraps, trains (applying the masks) and strips one copy of the original.

    Returns:
        (stripped tf_keras model, seconds).
    """
    tf_keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, end_step=1, frequency=1)
    model = tfmot.sparsity.keras.prune_low_magnitude(original_model(arrays), pruning_schedule=schedule)
    model.compile(tf_keras.optimizers.Adam(learning_rate),
                  tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = arrays["x_train"], arrays["y_train"]
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    if epochs:
        model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=callbacks)
    else:  # one step that moves nothing: only the masks are applied
        model.fit(x[:batch_size], y[:batch_size], epochs=1, batch_size=batch_size, verbose=0, callbacks=callbacks)
    stripped = tfmot.sparsity.keras.strip_pruning(model)
    return stripped, time.perf_counter() - start


def describe(model, name, workdir, x_test, seconds):
    kernels = [layer.kernel.numpy() for layer in model.layers]
    biases = [layer.bias.numpy() for layer in model.layers]
    np.savez(workdir / f"tfmot_{name}.npz", **{f"k{i}": k for i, k in enumerate(kernels)},
             **{f"b{i}": b for i, b in enumerate(biases)})
    tflite = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path = workdir / f"tfmot_{name}.tflite"
    path.write_bytes(tflite)
    return {
        "kernel_weights": int(sum(k.size for k in kernels)),
        "nonzero_kernel_weights": int(sum(np.count_nonzero(k) for k in kernels)),
        "nonzero_weights": int(sum(np.count_nonzero(k) for k in kernels) + sum(np.count_nonzero(b) for b in biases)),
        "params": int(model.count_params()),
        "layer_sparsity": [round(1 - np.count_nonzero(k) / k.size, 6) for k in kernels],
        "test_predictions": np.argmax(model.predict(x_test, batch_size=256, verbose=0), axis=1).tolist(),
        "seconds": round(seconds, 3),
        "tflite": str(path),
        "tflite_bytes": len(tflite),
        "tflite_gzip_bytes": len(gzip.compress(tflite, 9)),
    }


def main(workdir):
    workdir = Path(workdir)
    tf.get_logger().setLevel("ERROR")
    with np.load(workdir / "tfmot_input.npz", allow_pickle=False) as loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    kernel_weights = sum(arrays[f"k{i}"].size for i in range(len(arrays["activations"])))
    sparsity = 1.0 - float(arrays["target_nonzeros"]) / kernel_weights
    settings = {key: arrays[key].item() for key in ("epochs", "batch_size", "learning_rate", "seed")}
    result = {"sparsity": sparsity, "tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
              "tfmot": tfmot.__version__, "variants": {}}
    stdout = os.dup(1)
    os.dup2(2, 1)  # anything TensorFlow prints goes to stderr: stdout carries only the JSON
    try:
        for name, epochs, learning_rate in (("masks_only", 0, 0.0),
                                            ("finetuned", int(settings["epochs"]), float(settings["learning_rate"]))):
            model, seconds = pruned(arrays, sparsity, epochs, learning_rate, int(settings["batch_size"]),
                                    int(settings["seed"]))
            result["variants"][name] = describe(model, name, workdir, arrays["x_test"], seconds)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

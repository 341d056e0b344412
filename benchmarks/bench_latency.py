"""Latency of keras.applications CNNs after `prune --mode data --keep-ratio 0.5`, against the FLOPs ratio (issue 20).

Target: the measured speed-up is at least 0.7 of the FLOPs ratio (FLOPs before / after)
on TFLite (XNNPACK, one thread, batch 1) and on a compiled forward (`tf.function`, batch
256).

Run: `.venv/bin/python benchmarks/bench_latency.py [--size 96] [--models MobileNetV2,ResNet50,EfficientNetB0]`
(part of `make bench`); it rewrites its section of benchmarks/RESULTS.md. Each model runs
in a fresh process: built with weights=None (seeded) at SIZE x SIZE x 3, logits
(`classifier_activation=None`), pruned by `keras_embed.prune(model, data=x, mode="data",
rule=StoppingRule("keep_ratio", 0.5))` on 256 seeded standard-normal images; then both
models are timed the same way, interleaved:
    tflite b1, b32   `write_tflite` (the CLI's export), `tf.lite.Interpreter(num_threads=1)`
                     (XNNPACK is TFLite's default CPU delegate), `invoke()` on a batch of 1 and
                     of 32
    forward b256     `tf.function(lambda x: model(x, training=False))` on a batch of 256
Each of ROUNDS (5) rounds times, for the original then the pruned model, one call after one untimed
call (the first traces); the figures are the medians over the rounds.
Speed-up = original time / pruned time; "of FLOPs" = speed-up / FLOPs ratio, with FLOPs
from the prune report (multiply-adds counted as two).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEFAULT_MODELS = "MobileNetV2,ResNet50,EfficientNetB0"
SAMPLES, ROUNDS, TARGET = 256, 5, 0.7
KINDS = ("tflite b1", "tflite b32", "forward b256")


INTERPRETATION = """\
- FLOPs count multiply-adds of the producers (convolutions, Dense); the elementwise layers (activations, the
  squeeze-and-excitation gates' multiplies, BatchNormalization kept where it does not fold, pooling) cost time in
  proportion to the activations they touch, not to FLOPs, and data mode halves channels, not positions. Networks
  made mostly of large convolutions (ResNet50) come closest to the FLOPs ratio; those with many depthwise
  convolutions and elementwise ops per FLOP (MobileNetV2, EfficientNetB0: swish, SE gates) fall further short, most
  in the batch-256 forward where those memory-bound ops dominate on 2 cores.
- Sizes: 96x96 inputs, not 224x224, because data mode on ResNet50 at 224 takes about half an hour on this 2-core
  machine (ZOO.md: 186 s at 64x64); at 224 the convolutions' share of the time grows, so the ratios should move
  towards the FLOPs ratio, not away. Random (weights=None) models: the widths data mode keeps, and so the speed-ups,
  differ on trained weights; the timing method does not."""


def _timed_once(call):
    """Seconds of one `call()` after an untimed one."""
    call()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _tflite_timer(model, batch, folder, name):
    import numpy as np
    import tensorflow as tf

    from keras_embed.files.save import write_tflite

    path = Path(folder) / f"{name}.tflite"
    write_tflite(model, path)
    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=1)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], (batch, *detail["shape"][1:]))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], np.random.default_rng(1).standard_normal(
        (batch, *detail["shape"][1:])).astype("float32"))
    return interpreter.invoke


def _forward_timer(model, batch):
    import numpy as np
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(1).standard_normal((batch, *model.input_shape[1:])).astype("float32"))
    forward = tf.function(lambda inputs: model(inputs, training=False))
    return lambda: forward(x).numpy()


def measure(name, size):
    """{kind: (original s, pruned s)}, the FLOPs before and after, and the prune seconds."""
    import keras
    import numpy as np

    from keras_embed import prune
    from keras_embed.stopping import StoppingRule

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    x = np.random.default_rng(0).standard_normal((SAMPLES, size, size, 3)).astype("float32")
    start = time.perf_counter()
    pruned, report = prune(model, data=x, mode="data", rule=StoppingRule("keep_ratio", 0.5))
    seconds = time.perf_counter() - start
    figures = report.to_dict()
    timed = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in KINDS:
            timers = [(_tflite_timer(candidate, int(kind.split("b")[1]), folder, f"{label}_{kind[-2:]}")
                       if kind.startswith("tflite") else _forward_timer(candidate, int(kind.split("b")[1])))
                      for label, candidate in (("original", model), ("pruned", pruned))]
            rounds = [[], []]
            for _ in range(ROUNDS):  # interleaved: noise hits both
                for index, timer in enumerate(timers):
                    rounds[index].append(_timed_once(timer))
            timed[kind] = [statistics.median(values) for values in rounds]
    return {"timed": timed, "flops": [figures["flops_before"], figures["flops_after"]],
            "params": [figures["params_before"], figures["params_after"]], "prune_seconds": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--child", nargs=2)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(measure(arguments.child[0], int(arguments.child[1]))))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from results import load, section, write_section

    before = load()
    lines = ["| model | params before / after | FLOPs ratio | prune s | " + " | ".join(
        f"{kind}: original / pruned ms, speed-up, of FLOPs" for kind in KINDS) + " |",
        "| --- " * (4 + len(KINDS)) + "|"]
    shortfalls = []
    for name in arguments.models.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", name, str(arguments.size)], capture_output=True,
                              text=True)
        if done.returncode:
            lines.append(f"| {name} | failed: {done.stderr.strip().splitlines()[-1][:200]} |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = result["flops"][0] / result["flops"][1]
        cells = []
        for kind in KINDS:
            original, pruned = result["timed"][kind]
            share = original / pruned / ratio
            cells.append(f"{1000 * original:.1f} / {1000 * pruned:.1f}, {original / pruned:.2f}x, {share:.2f}")
            if share < TARGET:
                shortfalls.append(f"{name} {kind} ({share:.2f})")
        lines.append(f"| {name} {arguments.size}x{arguments.size} | {result['params'][0]:,} / {result['params'][1]:,} "
                     f"| {ratio:.2f} | {result['prune_seconds']:.0f} | " + " | ".join(cells) + " |")
    verdict = ("every speed-up is at least 0.7 of the FLOPs ratio" if not shortfalls
               else "below 0.7 of the FLOPs ratio: " + ", ".join(shortfalls))
    text = section("Latency after data mode, keep ratio 0.5 (benchmarks/bench_latency.py)",
                   f"benchmarks/bench_latency.py --size {arguments.size} --models {arguments.models}", before,
                   __doc__, [*lines, "", f"Verdict: {verdict}."], INTERPRETATION)
    print(text)
    write_section("latency", text)


if __name__ == "__main__":
    main()

"""How each step of exact pruning grows with the model: ResNet50/101/152 and EfficientNetB0/B4/B7 (issue 20).

Requirement: no step is quadratic in the number of layers (seconds per layer stay flat
from ResNet50 to ResNet152, 177 to 517 layers, and from EfficientNetB0 to B7, 238 to 813),
weights are held once (the graph keeps a float32 model's weights in float32 and hands
each layer's out as float64 while a step reads it), and the verification is batched.

Run: `.venv/bin/python benchmarks/bench_scale.py [--size 64] [--models ResNet50,ResNet152]`
Each model runs in its own fresh process (weights=None, seeded, no download; 32 seeded
standard-normal images at --size). One channel of three groups is split first
(`embed --widen`, the test oracle), so prune has something to find. Steps, wall clock:
    read      `read_model`: the Keras model to the graph (weights as the layers keep them)
    stats     the one statistics pass over the 32 images (`pipeline.statistics`)
    plan      `plan_prune`: the weight rules, data rules and collapses, in rounds
    apply     `apply_plan`: the surgery on the graph
    build     `build_model`: the graph back to a Keras model
    verify    `assert_outputs_preserved` on the 32 images, batched
Memory: peak RSS of the process (`ru_maxrss`) against the RSS after building the model and
predicting once (the base), the model's float32 weight bytes, and the bytes the graph holds
(`Weights.stored`): of the graph read from the widened model (float32, as the model keeps
them) and of the pruned graph (the layers an edit rewrote are float64, the rest float32).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

INTERPRETATION = """(written from the run of 2026-12-07 on this 2-core machine; see the table above for the figures)
- No step is quadratic in the number of layers: from ResNet50 to ResNet152 (177 to 517 layers, 2.9x) the
  structural steps (read, plan, apply, build) take 27.5 then 20.4 ms per layer (0.19 and 0.17 s per million
  parameters), the statistics pass and the verification grow with the forward pass (2.8x, 2.9x). Across
  EfficientNetB0, B4 and B7 (240 to 816 layers) the layers widen too, so the time per layer grows (6.2 to 23.2 ms)
  while the time per parameter stays flat (0.28, 0.27, 0.28 s per million): the steps follow the weights, not the
  layer count. (plan on EfficientNetB7 was 25.7 s on the same machine before compose_layers used matmul instead of einsum.)
- Every pruned model equals its widened model on the 32 images (max abs diff at most 2.8e-9); the params after
  pruning are below the original's because BatchNormalization folds into the convolutions and, on random weights
  and 32 random images, many relu channels are dead on the data (the data rules remove them exactly on that data).
- Memory: the graph read from a model holds its weights once, in float32 (graph MiB = weights MiB); a layer an edit
  rewrites is held in float64, so the pruned ResNets, where BatchNormalization folds into every convolution, hold
  1.7x. Before (2026-12-03, every weight a float64 copy) the peak - base RSS was 1885 MiB on ResNet152 and 2458 MiB
  on EfficientNetB7, now 1693 and 1799. This benchmark keeps several models and graphs alive at once (the original,
  the widened graph and model, its graph, the reduced graph, the pruned model), so its peak - base RSS is an upper
  bound; what one `keras-embed prune` process takes against one that only loads and predicts is in ZOO.md
  (bench_zoo_speed.py)."""
DEFAULT_MODELS = "ResNet50,ResNet101,ResNet152,EfficientNetB0,EfficientNetB4,EfficientNetB7"
SAMPLES = 32
WIDEN = {"ResNet": ("conv1_conv", "conv3_block1_1_conv", "conv5_block1_2_conv"),
         "EfficientNet": ("stem_conv", "block3a_expand_conv", "top_conv")}


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _held_mib(graph):
    return sum(weight.nbytes for node in graph.nodes for weight in node.weights.stored) / 2**20


def run_model(name, size):
    """Every step on one model in this process; returns its figures."""
    import keras
    import numpy as np

    from keras_embed.edit.operators import widen
    from keras_embed.edit.surgery import apply_plan
    from keras_embed.model.build import build_model
    from keras_embed.model.read import read_model
    from keras_embed.pipeline import plan_prune, statistics
    from keras_embed.verify import assert_outputs_preserved

    keras.utils.set_random_seed(0)
    original = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    x = np.random.default_rng(0).standard_normal((SAMPLES, size, size, 3)).astype("float32")
    original.predict(x, verbose=0)
    figures = {"model": name, "layers": len(original.layers), "params": original.count_params(),
               "weight_mib": sum(weight.numpy().nbytes for weight in original.weights) / 2**20, "base_mib": _rss_mib()}
    graph = read_model(original)
    for layer in WIDEN["ResNet" if name.startswith("ResNet") else "EfficientNet"]:
        graph = widen(graph, layer, 0, 0.3)
    model = build_model(graph)
    figures["params_widened"] = model.count_params()
    steps = {}

    def timed(step, function, *args):
        start = time.perf_counter()
        value = function(*args)
        steps[step] = round(time.perf_counter() - start, 2)
        return value

    graph = timed("read", read_model, model)
    figures["graph_mib"] = _held_mib(graph)
    stats = timed("stats", statistics, graph, x, SAMPLES)
    analysis = timed("plan", plan_prune, graph, stats)
    reduced = timed("apply", apply_plan, graph, analysis.plan)
    figures["pruned_graph_mib"] = _held_mib(reduced)
    pruned = timed("build", build_model, reduced)
    diff, _ = timed("verify", assert_outputs_preserved, model, pruned, x, None, True, SAMPLES)
    figures.update(steps=steps, params_pruned=pruned.count_params(), max_abs_diff=float(diff), peak_mib=_rss_mib())
    return figures


def table(results):
    steps = ("read", "stats", "plan", "apply", "build", "verify")
    lines = ["| model (64x64) | layers | params | widened -> pruned | " + " | ".join(f"{step} s" for step in steps)
             + " | read+plan+apply+build: ms per layer, s per M params | max abs diff | weights MiB "
             "| graph MiB: read, pruned | peak - base RSS MiB |", "| --- " * (len(steps) + 9) + "|"]
    for row in results:
        structural = sum(row["steps"][step] for step in ("read", "plan", "apply", "build"))
        lines.append(f"| {row['model']} | {row['layers']} | {row['params']:,} | {row['params_widened']:,} -> "
                     f"{row['params_pruned']:,} | " + " | ".join(f"{row['steps'][step]:.2f}" for step in steps)
                     + f" | {1000 * structural / row['layers']:.1f}, {structural / row['params'] * 1e6:.2f} | "
                     f"{row['max_abs_diff']:.1e} | {row['weight_mib']:.0f} | {row['graph_mib']:.0f}, "
                     f"{row['pruned_graph_mib']:.0f} | {row['peak_mib'] - row['base_mib']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_model(args.one, args.size)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from results import load, section, write_section

    before, results = load(), []
    for name in args.models.split(","):
        child = subprocess.run([sys.executable, __file__, "--one", name, "--size", str(args.size)], capture_output=True,
                               text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if child.returncode:
            sys.exit(f"{name} failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['steps']}", file=sys.stderr)
    text = section("Exact pruning as models grow (benchmarks/bench_scale.py)",
                   f"benchmarks/bench_scale.py --size {args.size} --models {args.models}", before, __doc__,
                   [table(results)], INTERPRETATION)
    print(text)
    write_section("scale", text)


if __name__ == "__main__":
    main()

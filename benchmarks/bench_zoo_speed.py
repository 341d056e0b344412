"""Speed and memory of analyze, exact prune and data mode on keras.applications CNNs (issue 17).

Requirement: exact `prune(model, data=x)` on ResNet50 at 224x224 with 256 calibration
images takes at most 10x one `model.predict` over them, and its peak memory stays under 4x
that of a process that builds the model and predicts one batch; `--mode data --keep-ratio
0.5` finishes in a few predicts.

Run: `.venv/bin/python benchmarks/bench_zoo_speed.py [--size 224] [--models ResNet50,InceptionV3]`
It prints a Markdown table (InceptionV3 takes 75x75 and up). Each step runs in its own fresh process (the same seeded model,
weights=None, no download; the same 256 seeded standard-normal images):
    baseline  build the model, predict one batch of 256: its peak RSS is the memory base
    predict   model.predict over the 256 images (batch 256), timed after one warm-up call
    analyze   keras_embed.analyze(model, data=x)
    exact     keras_embed.prune(model, data=x)
    data      keras_embed.prune(model, data=x, mode="data", rule=StoppingRule("keep_ratio", 0.5))
Times are wall clock of the step alone (building the model and importing TensorFlow
excluded); peak RSS is the process's ru_maxrss (building and importing included, as in
the baseline). Ratios: step time / predict time, step RSS / baseline RSS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STEPS = ("baseline", "analyze", "exact", "data")
DEFAULT_MODELS = "ResNet50,InceptionV3,DenseNet121"
SAMPLES = 256


def _model_and_data(name, size):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    x = np.random.default_rng(0).standard_normal((SAMPLES, size, size, 3)).astype("float32")
    return model, x


def run_step(step, name, size):
    """Runs one step in this process; returns {seconds, predict_seconds (baseline only), ...}."""
    model, x = _model_and_data(name, size)
    result = {}
    if step == "baseline":
        model.predict(x, batch_size=SAMPLES, verbose=0)  # one batch: the memory base, and the warm-up
        start = time.perf_counter()
        model.predict(x, batch_size=SAMPLES, verbose=0)
        result["seconds"] = time.perf_counter() - start
    else:
        from keras_embed import analyze, prune
        from keras_embed.stopping import StoppingRule

        start = time.perf_counter()
        if step == "analyze":
            analyze(model, data=x)
        elif step == "exact":
            _, report = prune(model, data=x)
            result["params"] = [report.params_before, report.params_after]
        else:
            _, report = prune(model, data=x, mode="data", rule=StoppingRule("keep_ratio", 0.5))
            result["params"] = [report.params_before, report.params_after]
        result["seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def measure(step, name, size, timeout):
    """`run_step` in a fresh process; None when it fails or runs past `timeout` seconds."""
    command = [sys.executable, __file__, "--child", step, "--models", name, "--size", str(size)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows, size):
    lines = [f"| model ({size}x{size}, {SAMPLES} images) | predict s | baseline RSS MiB | step | s | x predict "
             "| peak RSS MiB | x baseline | params before -> after |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, results in rows:
        base = results["baseline"]
        if "error" in base:
            lines.append(f"| {name} | baseline failed: {base['error']} | | | | | | | |")
            continue
        for step in STEPS[1:]:
            found = results.get(step)
            if found is None:
                continue
            if "error" in found:
                lines.append(f"| {name} | {base['seconds']:.2f} | {base['peak_rss_mib']:.0f} | {step} | "
                             f"{found['error']} | | | | |")
                continue
            params = " -> ".join(f"{count:,}" for count in found.get("params", []))
            memory = found["peak_rss_mib"]
            lines.append(f"| {name} | {base['seconds']:.2f} | {base['peak_rss_mib']:.0f} | {step} | "
                         f"{found['seconds']:.1f} | {found['seconds'] / base['seconds']:.1f} | "
                         f"{memory:.0f} | {memory / base['peak_rss_mib']:.2f} | {params} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated keras.applications names")
    parser.add_argument("--steps", default=",".join(STEPS[1:]), help="comma-separated steps besides the baseline")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one step may take")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_step(args.child, args.models, args.size)))
        return
    rows = []
    for name in args.models.split(","):
        results = {"baseline": measure("baseline", name, args.size, args.timeout)}
        for step in args.steps.split(","):
            results[step] = measure(step, name, args.size, args.timeout)
            print(f"{name} {step}: {json.dumps(results[step])}", file=sys.stderr, flush=True)
        rows.append((name, results))
    print(table(rows, args.size))


if __name__ == "__main__":
    main()

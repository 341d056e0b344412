"""Benchmark: the statistics pass streams a generated tf.data pipeline in memory that does not grow with its rows.

Requirement (issue 20): one statistics pass over 1,000,000 rows of a generated `tf.data`
pipeline runs in memory that does not grow with the row count (peak RSS at 100,000 and at
1,000,000 rows within 10%), at no less than 2/3 of `model.predict`'s throughput on the same
data.

Run with `make bench` (= `.venv/bin/python benchmarks/bench_stream.py`); it rewrites its
section of benchmarks/RESULTS.md.

What is measured: a 784-512-512-10 relu MLP (the size of an MNIST model people train,
seeded Glorot weights); the data is `tf.data.Dataset.range(N // B)` mapped to batches of B
seeded standard-normal rows (`tf.random.stateless_normal`), made as they are read, never
held. For each N a fresh child process warms both calls up on one batch, then times
    statistics  `keras_embed.pipeline.statistics(read_model(model), dataset)`: the exact
                data rules' one pass (every layer's extremes, moments and affine fit);
    predict     `model.predict(dataset, verbose=0)` on the same pipeline;
and reports the peak RSS (`ru_maxrss`) after the statistics pass, before predict runs.
Rows/s and ratio = statistics rows/s / predict rows/s come from the same child, so both
meet the same machine load.
"""

import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SIZES = (100_000, 1_000_000)
BATCH = 1024
WIDTHS = (784, 512, 512, 10)
MEMORY_LIMIT = 0.10  # peak RSS at the largest N within this share of the smallest
THROUGHPUT_LIMIT = 2 / 3  # statistics rows/s at least this share of predict's


INTERPRETATION = """\
- Memory: the pipeline makes each batch as it is read and the pass keeps per-channel figures only, so the peak is
  the model, TensorFlow and one batch of every layer's outputs, whatever the row count.
- Throughput: `data.batches` prefetches a dataset (`prefetch(AUTOTUNE)`), so the pipeline makes the next batches
  while the pass reduces this one, as `predict` does with its own iterator.
- Runs on 2026-12-03, before the reduction was made cheaper: 0.55 (100,000) and 0.66 (1,000,000) in one run, 0.77 and
  1.35 in another. Per batch of 1,024 rows the reduction then cost about 1.2x the forward pass. Three changes of
  2026-12-04 (`measure/reduce.py`) took one batch of the pass from 20.2 ms to 10.9 ms against the model's 7-9 ms
  (a loop of 30 calls on one batch): counting positive pre-activations as an int32 sum (`count_nonzero` to int64
  took 43 ms where the int32 sum takes 10 ms on a 147,456 x 96 tensor), computing the extremes and the float64
  mean of a tensor once when two requests read it (one producer's output is the next one's input), and tracing
  without autograph (Keras layers need none; the trace fell from about 1.1 s to a few tenths). At 100,000 rows the
  probe's build and trace still weigh; at 1,000,000 they do not.
  Two runs after the change: 0.69 and 0.85 alone on the machine, 0.83 and 1.00 (the table) beside another process."""


def _model():
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(width, activation="relu") for width in WIDTHS[1:-1]] + [keras.layers.Dense(WIDTHS[-1])]
    return keras.Sequential([keras.Input((WIDTHS[0],)), *layers], name="mlp_784_512_512_10")


def _pipeline(rows):
    import tensorflow as tf

    return tf.data.Dataset.range(rows // BATCH).map(
        lambda index: tf.random.stateless_normal((BATCH, WIDTHS[0]), seed=tf.stack([index, 0])))


def measure(rows):
    """(statistics seconds, predict seconds, peak RSS MiB after the statistics) for `rows` rows."""
    from keras_embed import read_model
    from keras_embed.pipeline import statistics

    model = _model()
    graph = read_model(model)
    statistics(graph, _pipeline(BATCH))
    model.predict(_pipeline(BATCH), verbose=0)
    start = time.perf_counter()
    statistics(graph, _pipeline(rows))
    passed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    model.predict(_pipeline(rows), verbose=0)
    return passed, time.perf_counter() - start, peak


def _child(rows):
    done = subprocess.run([sys.executable, __file__, "--child", str(rows)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from results import load, machine, write_section

    before = load()
    runs = {rows: _child(rows) for rows in SIZES}
    after = load()
    lines = ["| rows | statistics s | statistics rows/s | predict s | predict rows/s | ratio | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rows, (passed, predicted, peak) in runs.items():
        lines.append(f"| {rows:,} | {passed:.1f} | {rows / passed:,.0f} | {predicted:.1f} | {rows / predicted:,.0f} | "
                     f"{predicted / passed:.2f} | {peak:.0f} |")
    small, large = runs[SIZES[0]][2], runs[SIZES[-1]][2]
    growth = large / small - 1
    ratio = min(predicted / passed for passed, predicted, _ in runs.values())
    verdict = (f"peak RSS grows {100 * growth:+.1f}% from {SIZES[0]:,} to {SIZES[-1]:,} rows "
               f"({'pass' if growth <= MEMORY_LIMIT else 'FAIL'}: within {100 * MEMORY_LIMIT:.0f}%); "
               f"the statistics pass runs at {ratio:.2f} of predict's throughput at worst "
               f"({'pass' if ratio >= THROUGHPUT_LIMIT else 'FAIL'}: at least {THROUGHPUT_LIMIT:.2f}).")
    text = "\n".join([
        "## Streaming statistics pass (benchmarks/bench_stream.py)", "",
        f"Generated by `make bench` on {datetime.datetime.now().isoformat(timespec='seconds')}. Machine: {machine()}. "
        f"1-minute load average {before} before the run, {after} after it.", "",
        "### What is measured",
        __doc__.split("What is measured: ", 1)[1].strip(), "",
        "### Results", *lines, "", f"Verdict: {verdict}", "",
        "### Interpretation", INTERPRETATION,
    ])
    print(text)
    write_section("stream", text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(int(sys.argv[2]))))
    else:
        main()

"""Benchmark of the statistics pass (`keras_embed.measure.statistics.collect`) against its baseline.

Requirement: one pass of statistics over N samples costs no more than
1.5 x (the model's own `predict` over the same samples + one float32 matmul per hidden
layer for the Gram matrix).

Run with `make bench` (= `.venv/bin/python benchmarks/bench_stats.py`); it prints a table
and rewrites its section of benchmarks/RESULTS.md.

What is measured, on saved_models/digits_widened.keras (64-48-36-10) with synthetic
inputs x = np.random.default_rng(0).random((N, 64), dtype=np.float32), for each N and
batch size B, all in one process:
    collect     collect(read_model(model), x, batch_size=B, gram=True)  (read_model: ~2 ms)
    collect-1t  the same inside threadpoolctl.threadpool_limits(1, "blas"): NumPy's BLAS
                on one thread (a diagnostic, not part of the requirement)
    no-gram     collect(read_model(model), x, batch_size=B, gram=False)
    predict     model.predict(x, batch_size=B, verbose=0)
    matmul      for each hidden layer, a.T @ a of its float32 (N, width + 1) matrix [a, 1];
                the activations are computed once beforehand, only the matmuls are timed
    baseline    predict + matmul;  ratio = collect / baseline  (pass: median ratio <= 1.5)
Every call runs once as a warm-up (the first call traces the TF functions), then REPEATS
rounds run every call once each, in an order rotated every round, so machine noise hits
collect and the baseline alike. Times are wall clock (time.perf_counter); the table shows
the median and the min of the rounds, and the ratio both of medians and of mins.
The same calls on a single sample give each call's fixed cost.
"""

import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import threadpoolctl  # noqa: E402

from keras_embed import read_model  # noqa: E402
from keras_embed.measure.statistics import Request, collect  # noqa: E402
from results import load, machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "saved_models" / "digits_widened.keras"
SIZES = (10_000, 100_000)
BATCH_SIZES = (1024, 256)
REPEATS = 5
LIMIT = 1.5
TIMED = ("collect", "collect-1t", "no-gram", "predict", "matmul")


def synthetic_inputs(n):
    """The benchmark inputs: n uniform [0, 1) rows of 64 float32 features, seed 0."""
    return np.random.default_rng(0).random((n, 64), dtype=np.float32)


def gram_inputs(model, x):
    """[a, 1] in float32 for every hidden layer (each Dense but the last; the example
    model keeps its activations inside the Dense layers)."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][:-1]
    outputs = keras.Model(model.inputs, [layer.output for layer in dense]).predict(x, batch_size=4096, verbose=0)
    ones = np.ones((len(x), 1), dtype=np.float32)
    return [np.ascontiguousarray(np.hstack([np.asarray(a, dtype=np.float32), ones])) for a in outputs]


def one_blas_thread(call):
    """`call`, run with NumPy's BLAS limited to one thread."""
    def limited():
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            return call()
    return limited


def tasks(model, x, batch_size):
    """The timed calls, by name (see module docstring)."""
    augmented = gram_inputs(model, x)

    def stats_pass(gram):
        def run():
            graph = read_model(model)
            hidden = graph.producers[:-1]
            requests = {node.name: Request(((f"{node.name}/z", None),), ((node.name, None),), node.width, gram)
                        for node in hidden}
            return collect(graph, x, requests, batch_size=batch_size)
        return run

    return {
        "collect": stats_pass(True),
        "collect-1t": one_blas_thread(stats_pass(True)),
        "no-gram": stats_pass(False),
        "predict": lambda: model.predict(x, batch_size=batch_size, verbose=0),
        "matmul": lambda: [a.T @ a for a in augmented],
    }


def seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(calls, repeats=REPEATS):
    """Warms every call up once, then times `repeats` interleaved rounds.

    Returns:
        {name: (median, min)} in seconds.
    """
    for call in calls.values():
        call()
    names = list(calls)
    times = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(calls[name]))
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def ratio(timing, which=0, name="collect"):
    """`name` / (predict + matmul), from medians (which=0) or mins (which=1)."""
    return timing[name][which] / (timing["predict"][which] + timing["matmul"][which])


def run_all():
    """Times every (N, batch size), printing each row, then the 1-sample calls.

    Returns:
        (rows, fixed): rows are (N, batch size, timing); timings as `measure` returns them.
    """
    model = keras.saving.load_model(MODEL)
    rows = []
    for n in SIZES:
        x = synthetic_inputs(n)
        for batch_size in BATCH_SIZES:
            rows.append((n, batch_size, measure(tasks(model, x, batch_size))))
            print(format_row(rows[-1]), flush=True)
    fixed = measure(tasks(model, synthetic_inputs(1), BATCH_SIZES[0]))
    return rows, fixed


def pair(timing, name):
    median, minimum = timing[name]
    return f"{median:.3f} ({minimum:.3f})"


COLUMNS = ("N", "batch", *(f"{name} s" for name in TIMED), "ratio (medians)", "ratio (mins)", f"ratio <= {LIMIT}")


def format_row(row):
    n, batch_size, timing = row
    verdict = "pass" if ratio(timing) <= LIMIT else "FAIL"
    cells = (f"{n:,}", str(batch_size), *(pair(timing, name) for name in TIMED),
             f"{ratio(timing):.2f}", f"{ratio(timing, 1):.2f}", verdict)
    return "| " + " | ".join(cells) + " |"


def table_header(columns=COLUMNS):
    return "| " + " | ".join(columns) + " |\n" + "|" + "|".join(" --- " for _ in columns) + "|"


def row_interpretation(row, fixed):
    n, batch_size, timing = row
    collect_s, one_thread_s, no_gram_s, predict_s, matmul_s = (timing[name][0] for name in TIMED)
    per_sample = {name: 1e6 * (timing[name][0] - fixed[name][0]) / n for name in ("collect", "predict")}
    return (
        f"- N = {n:,}, batch {batch_size}: ratio {ratio(timing):.2f}, {ratio(timing, 0, 'collect-1t'):.2f} with one "
        f"BLAS thread; without the Gram matrix collect takes {no_gram_s / predict_s:.2f} x predict. The Gram matrix "
        f"adds {collect_s - no_gram_s:.3f} s ({one_thread_s - no_gram_s:.3f} s with one BLAS thread) where its "
        f"float32 matmul baseline takes {matmul_s:.3f} s. Beyond the fixed cost: collect "
        f"{per_sample['collect']:.2f} us/sample, predict {per_sample['predict']:.2f} us/sample.{noisy(timing)}"
    )


def noisy(timing):
    """A warning naming the calls whose median is more than twice their min."""
    names = [name for name in TIMED if timing[name][0] > 2 * timing[name][1]]
    return f" Noisy: the median of {', '.join(names)} is more than twice its min." if names else ""


def interpretation(rows, fixed):
    """Plain statements read off the numbers (medians)."""
    failing = [f"N = {n:,}, batch {b} ({ratio(timing):.2f})" for n, b, timing in rows if ratio(timing) > LIMIT]
    verdict = (f"median ratio above {LIMIT} at " + "; ".join(failing) + "." if failing
               else f"every median ratio is at most {LIMIT}.")
    return "\n".join([
        f"- Verdict: {verdict}",
        f"- Fixed cost per call (1 sample): collect {fixed['collect'][0]:.3f} s, predict {fixed['predict'][0]:.3f} s. "
        "collect builds a new probe model on every call, so its TF function is traced on every call "
        "(a warm-up cannot remove that), and again for a final batch of another size.",
        *(row_interpretation(row, fixed) for row in rows),
        "- collect accumulates the Gram matrix with one small float64 matmul per batch and layer through NumPy's "
        "multi-threaded BLAS. When another process holds a core, each of those calls can wait for a scheduler "
        "time slice, so collect then pulls away from collect-1t (look at the load average above). The machine "
        "is shared and noisy: medians of interleaved rounds are the figures to trust, and ratios near the limit "
        "can land on either side from one run to the next.",
    ])


def write_results(rows, fixed, loads):
    text = f"""## Statistics pass (benchmarks/bench_stats.py)

Generated by `make bench` (`.venv/bin/python benchmarks/bench_stats.py`) on {datetime.datetime.now().isoformat(timespec="seconds")}.

Machine: {machine()}. 1-minute load average {loads[0]} before the run, {loads[1]} after it
(the machine is shared; a load near or above nproc means other processes took cores during the run).

### What is measured
Requirement: one pass of statistics over N samples costs no more than {LIMIT} x (the model's own `predict`
over the same samples + one float32 matmul per hidden layer for the Gram matrix).

Model `saved_models/digits_widened.keras` (64-48-36-10, hidden layers relu 48 and tanh 36); inputs
`np.random.default_rng(0).random((N, 64), dtype=np.float32)`. Per N and batch size B, in one process:

- **collect**: `collect(read_model(model), x, batch_size=B, gram=True)` (`read_model` takes about 2 ms);
- **collect-1t**: the same inside `threadpoolctl.threadpool_limits(1, user_api="blas")` (NumPy's BLAS on one
  thread; a diagnostic, not part of the requirement);
- **no-gram**: `collect(read_model(model), x, batch_size=B, gram=False)`;
- **predict**: `model.predict(x, batch_size=B, verbose=0)`;
- **matmul**: for each hidden layer, `a.T @ a` of its float32 `(N, width + 1)` matrix `[a, 1]`, computed once
  beforehand; only the two matmuls are timed (summed);
- **ratio** = collect / (predict + matmul), from the medians and from the mins; pass when the median ratio <= {LIMIT}.

Each call runs once as a warm-up, then {REPEATS} rounds run every call once each, the order rotated every round
(interleaved, so noise hits collect and the baseline alike). Wall clock, `time.perf_counter`. Cells are
`median (min)` seconds.

### Results
{table_header()}
{chr(10).join(format_row(row) for row in rows)}

Fixed cost per call: the same calls on 1 sample (batch {BATCH_SIZES[0]}), median (min) seconds:

{table_header(tuple(f"{name} s" for name in TIMED))}
| {" | ".join(pair(fixed, name) for name in TIMED)} |

### Interpretation
{interpretation(rows, fixed)}
"""
    write_section("stats", text)


def main():
    before = load()
    print(machine(), "| load average", before)
    print(table_header(), flush=True)
    rows, fixed = run_all()
    after = load()
    print("fixed cost per call (1 sample):", ", ".join(f"{name} {pair(fixed, name)}" for name in TIMED))
    print("load average after the run", after)
    write_results(rows, fixed, (before, after))
    print("wrote benchmarks/RESULTS.md (section stats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

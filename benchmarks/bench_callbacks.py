"""Benchmark of `keras_embed.callbacks.EmbeddingMonitor`'s cost during training (issue 18).

Requirement: at its defaults the monitor costs at most 5% of fit time on the MNIST-1D
40-512-512-10 MLP and on a small residual CNN, measured with interleaved runs (ratio of fit
times).

Run with `make bench` (= `.venv/bin/python benchmarks/bench_callbacks.py`); it prints a table
and rewrites its section of benchmarks/RESULTS.md. It needs the `mnist1d` package (the `bench`
extra); the data set is generated offline by `mnist1d.data.make_dataset(get_dataset_args())`
(its download helpers are never called).

What is measured, all in one process, per model:
    MNIST-1D MLP  Dense 512 relu, Dense 512 relu, Dense 10 logits on the 4000 x 40 training rows
                  of MNIST-1D, batch 128 (32 steps
                  per epoch), EPOCHS["mnist1d"] = 60 epochs: the training loss falls all the way
    digits CNN    Conv2D(32, 3, same, relu), two residual blocks (Conv-BN-relu-Conv-BN, Add, relu),
                  GlobalAveragePooling2D, Dense 10 logits on sklearn's 8x8 digits
                  (`bundled_dataset("digits")` reshaped to (n, 8, 8, 1)), 1437 training rows
                  (a seeded split holds 360 out, unused here), batch 64 (23 steps per epoch),
                  EPOCHS["digits_cnn"] = 30 epochs (cut from 40 to keep the run under 10 minutes)
both with new weights from `keras.utils.set_random_seed(0)` (every fit starts from the same
weights), Adam, sparse categorical cross-entropy from logits, verbose=0, in three configurations:
    plain               no callback
    monitor             EmbeddingMonitor(probe_x, probe_y) at its defaults (monitor="loss",
                        patience 5, min_delta 1e-3 relative): the configuration the requirement
                        is judged on, against plain; probe = 512 training rows (seeded choice,
                        no repeats) with their labels
    monitor aggressive  EmbeddingMonitor(probe_x, probe_y, min_delta=0.05, patience=1): every
                        epoch in which the training loss falls by less than 5% of its best is a
                        plateau, so the plateau test fires often: a worst case that is reported,
                        not required (a val_loss monitor no longer serves as one: the monitor
                        does not analyse a val_loss plateau while the training loss still falls)
A fit is timed from the `fit` call to its return (wall clock, time.perf_counter); building and
compiling the model are outside. Inside the monitored fits, the time spent in the monitor's own
`on_train_begin` and `on_epoch_end` is summed and its analyses (`_analyse`: one redundancy
analysis and, on a plateau check, the 20-step Lanczos curvature check) are counted and timed by
a subclass that only adds timers, so the overhead is measured twice: as the ratio of the
medians of whole fits (monitored / plain), what a user sees but carrying the machine's
noise, and directly (seconds inside the monitor / the plain fits' median).
One WARMUP_EPOCHS-epoch warm-up fit per configuration, then REPEATS rounds fit every
configuration once each, the order rotated every round (interleaved); the table shows medians
and mins of the rounds. REPEATS is 5, to keep `make bench` for this file under about
10 minutes on a shared 2-core machine.
Last, a profile says where an analysis's time goes: PROFILED calls of the monitor's `_analyse`
(with curvature) on each trained model, under cProfile (cumulative seconds of named functions),
and three Hessian-vector products of a new `ProbeLoss` timed alone (the first traces).
"""

import cProfile
import datetime
import logging
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_embed.callbacks import EmbeddingMonitor  # noqa: E402
from keras_embed.files.data import bundled_dataset  # noqa: E402
from keras_embed.measure.curvature import ProbeLoss  # noqa: E402
from results import load, machine, write_section  # noqa: E402

MODELS = ("mnist1d", "digits_cnn")
TITLES = {"mnist1d": "MNIST-1D MLP 40-512-512-10", "digits_cnn": "digits residual CNN"}
EPOCHS = {"mnist1d": 60, "digits_cnn": 30}
BATCH_SIZE = {"mnist1d": 128, "digits_cnn": 64}
REPEATS = 5
WARMUP_EPOCHS = 2
PROBE = 512
LIMIT = 0.05
CONFIGS = ("plain", "monitor", "monitor aggressive")
REFERENCE = {"monitor": "plain", "monitor aggressive": "plain"}
AGGRESSIVE = {"min_delta": 0.05, "patience": 1}
PROFILED = 3
PARTS = {  # function name in the profile -> what it is
    "read_model": "read the weights (`read_model`)",
    "write_weights": "copy them into the probe model (`write_weights`)",
    "probe_redundancy": "redundancy analysis (`probe_redundancy`)",
    "__call__": "the probe's forward pass (`Prober`)",
    "update": "statistics and Gram matrices (`LayerStats.update`)",
    "producer_regimes": "linear regimes (`producer_regimes`)",
    "parallel_sets": "cosine groups (`parallel_sets`)",
    "probe_curvature": "curvature check (`probe_curvature`)",
    "hvp": "Hessian-vector products (`ProbeLoss.hvp`)",
    "_product": "tracing the HVP graph (`ProbeLoss._product`, runs only while tf.function traces)",
    "eigh_tridiagonal": "Ritz values (`eigh_tridiagonal`)",
}


class TimedMonitor(EmbeddingMonitor):
    """EmbeddingMonitor that also sums the seconds spent in its own hooks and counts and times
    its analyses."""

    def on_train_begin(self, logs=None):
        start = time.perf_counter()
        self.seconds, self.epochs_seen, self.checks, self.epoch_now = 0.0, 0, [], None
        super().on_train_begin(logs)
        self.seconds += time.perf_counter() - start

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        self.epoch_now = epoch
        super().on_epoch_end(epoch, logs)
        self.seconds += time.perf_counter() - start
        self.epochs_seen += 1

    def _analyse(self, curvature):
        start = time.perf_counter()
        super()._analyse(curvature)
        self.checks.append((self.epoch_now + 1, curvature, time.perf_counter() - start))


def compiled(model):
    model.compile(keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def mlp():
    inputs = keras.Input((40,), name="signal")
    hidden = keras.layers.Dense(512, activation="relu", name="hidden_1")(inputs)
    hidden = keras.layers.Dense(512, activation="relu", name="hidden_2")(hidden)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(hidden), name="mnist1d_mlp")


def residual_cnn():
    layers = keras.layers
    image = keras.Input((8, 8, 1), name="image")
    hidden = layers.Conv2D(32, 3, padding="same", activation="relu", name="stem")(image)
    for block in ("a", "b"):
        branch = layers.Conv2D(32, 3, padding="same", name=f"res_{block}_1")(hidden)
        branch = layers.Activation("relu")(layers.BatchNormalization(name=f"bn_{block}_1")(branch))
        branch = layers.Conv2D(32, 3, padding="same", name=f"res_{block}_2")(branch)
        branch = layers.BatchNormalization(name=f"bn_{block}_2")(branch)
        hidden = layers.Activation("relu")(layers.Add(name=f"add_{block}")([hidden, branch]))
    logits = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(hidden))
    return keras.Model(image, logits, name="digits_cnn")


BUILDERS = {"mnist1d": mlp, "digits_cnn": residual_cnn}


def fresh_model(model_name):
    keras.utils.set_random_seed(0)
    return compiled(BUILDERS[model_name]())


def datasets():
    """{model: (x, y, x_val, y_val, probe_x, probe_y)}."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # generated here, offline
    found = {"mnist1d": (data["x"].astype(np.float32), data["y"].astype(np.int64),
                         data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))}
    x, y = bundled_dataset("digits")
    x = x.reshape(-1, 8, 8, 1)
    order = np.random.default_rng(1).permutation(len(x))
    held, kept = np.sort(order[:360]), np.sort(order[360:])
    found["digits_cnn"] = (x[kept], y[kept], x[held], y[held])
    sets = {}
    for name, (x, y, x_val, y_val) in found.items():
        chosen = np.sort(np.random.default_rng(0).choice(len(x), PROBE, replace=False))
        sets[name] = (x, y, x_val, y_val, x[chosen], y[chosen])
    return sets


def fit_once(model_name, data, config, epochs):
    """One fit; returns (fit s, monitor s or None, the monitor's checks or None, history, model)."""
    x, y, x_val, y_val, probe_x, probe_y = data
    model = fresh_model(model_name)
    monitor = None
    if config == "monitor":
        monitor = TimedMonitor(probe_x, probe_y)
    elif config == "monitor aggressive":
        monitor = TimedMonitor(probe_x, probe_y, **AGGRESSIVE)
    start = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE[model_name], verbose=0,
                        callbacks=[] if monitor is None else [monitor])
    seconds = time.perf_counter() - start
    if monitor is None:
        return seconds, None, None, history.history, model
    assert monitor.epochs_seen == epochs
    return seconds, monitor.seconds, monitor.checks, history.history, model


def measure(model_name, data):
    """Warm-up, then REPEATS interleaved rounds. Returns {config: [(fit s, monitor s, checks), ...]},
    the history of the last fit of each configuration and the last model fitted with the aggressive monitor."""
    for config in CONFIGS:
        fit_once(model_name, data, config, WARMUP_EPOCHS)
    runs, histories, trained = {config: [] for config in CONFIGS}, {}, None
    for round_ in range(REPEATS):
        shift = round_ % len(CONFIGS)
        for config in CONFIGS[shift:] + CONFIGS[:shift]:
            fit_s, monitor_s, checks, histories[config], model = fit_once(model_name, data, config, EPOCHS[model_name])
            runs[config].append((fit_s, monitor_s, checks))
            trained = model if config == "monitor aggressive" else trained
            inside = "" if monitor_s is None else f", {monitor_s:.2f} s inside the monitor, {len(checks)} analyses"
            print(f"{model_name} round {round_ + 1} {config}: fit {fit_s:.2f} s{inside}", flush=True)
    return runs, histories, trained


def profile(model, probe_x, probe_y):
    """Seconds of each of PROFILED `_analyse(curvature=True)` calls on a trained model (the first
    one traces the probe model and the HVP graph), the seconds of three Hessian-vector products
    of a new `ProbeLoss` (the first traces) and the cumulative seconds per call of the named
    parts (see PARTS), from cProfile."""
    monitor = EmbeddingMonitor(probe_x, probe_y)
    monitor.set_model(model)
    monitor.on_train_begin()
    profiler, calls = cProfile.Profile(), []
    for _ in range(PROFILED):
        start = time.perf_counter()
        profiler.enable()
        monitor._analyse(curvature=True)
        profiler.disable()
        calls.append(time.perf_counter() - start)
    parts = {}
    rows = min(monitor.curvature_samples, len(probe_x))
    loss, vector = ProbeLoss(model, probe_x[:rows], probe_y[:rows]), None
    hvps = []
    for _ in range(3):  # a new ProbeLoss: its first product traces
        vector = np.random.default_rng(0).standard_normal(loss.size)
        start = time.perf_counter()
        loss.hvp(vector)
        hvps.append(time.perf_counter() - start)
    for (filename, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if name in PARTS and ("keras_embed" in filename or "callbacks" in filename or name == "eigh_tridiagonal"):
            parts[name] = parts.get(name, 0.0) + cumulative / PROFILED
    return calls, parts, hvps


def median(values):
    return statistics.median(values)


def summarize(runs):
    """Per configuration: median and min fit seconds, median monitor seconds, analyses per fit
    and seconds per analysis, and the two overhead figures against its reference (ratio of fit
    medians, and of fit mins; monitor time / reference fit median)."""
    rows = {}
    for config, values in runs.items():
        fits = [fit for fit, _, _ in values]
        rows[config] = {"median": median(fits), "min": min(fits), "inside": None}
        if config in REFERENCE:
            reference = [fit for fit, _, _ in runs[REFERENCE[config]]]
            inside = [seconds for _, seconds, _ in values]
            checks = [check for _, _, found in values for check in found]
            rows[config].update(
                inside=median(inside), ratio=median(fits) / median(reference), ratio_mins=min(fits) / min(reference),
                direct=median(inside) / median(reference), checks=median([len(found) for _, _, found in values]),
                per_check=median([seconds for _, _, seconds in checks]) if checks else None,
                check_epochs=[epoch for epoch, _, _ in values[-1][2]],
                check_seconds=[seconds for _, _, seconds in values[-1][2]],
            )
    return rows


def verdict(config, row):
    """For the default configuration: pass only when both the ratio of fit medians and the
    direct measurement are within the limit (fit times on a shared machine are noisy enough
    to pass or fail by chance alone). The worst case is reported, not judged."""
    within = row["ratio"] - 1.0 <= LIMIT and row["direct"] <= LIMIT
    if config == "monitor":
        return "pass" if within else "FAIL"
    return "(not required) " + ("within" if within else "over")


COLUMNS = ("model", "configuration", "analyses per fit", "fit s, median (min)", "inside monitor s, median",
           "s per analysis, median", "fit ratio, medians (mins)", "monitor time / plain fit", f"<= {LIMIT:.0%}")


def format_row(model_name, config, row):
    if config not in REFERENCE:
        cells = (TITLES[model_name], config, "-", f"{row['median']:.2f} ({row['min']:.2f})", "-", "-", "reference",
                 "-", "-")
    else:
        per_check = "-" if row["per_check"] is None else f"{row['per_check']:.2f}"
        cells = (TITLES[model_name], config, f"{row['checks']:g}",
                 f"{row['median']:.2f} ({row['min']:.2f})", f"{row['inside']:.2f}", per_check,
                 f"{row['ratio']:.3f} ({row['ratio_mins']:.3f})", f"{row['direct']:.1%}", verdict(config, row))
    return "| " + " | ".join(cells) + " |"


def table(all_rows):
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join(" --- " for _ in COLUMNS) + "|"
    return header + "\n" + "\n".join(format_row(model_name, config, rows[config])
                                     for model_name, rows in all_rows.items() for config in CONFIGS)


def what_it_saw(model_name, histories, rows):
    """Per monitored configuration: when it analysed and what it concluded, and how the
    monitored quantity went."""
    lines = []
    for config in REFERENCE:
        history, row = histories[config], rows[config]
        stalled = [epoch + 1 for epoch, value in enumerate(history["embed/stalled"]) if value]
        converged = [epoch + 1 for epoch, value in enumerate(history["embed/converged"]) if value]
        watched = "loss"
        values = history[watched]
        best = int(np.argmin(values)) + 1
        epochs = row["check_epochs"]
        checked = (f"analysed at epochs {', '.join(map(str, epochs))} (last fit; "
                   f"{', '.join(f'{seconds:.2f}' for seconds in row['check_seconds'])} s each)" if epochs else
                   f"never analysed: {watched} kept improving by more than the relative min_delta within every "
                   "`patience` epochs")
        curvature = history["embed/min_curvature"][-1]
        lines.append(
            f"{TITLES[model_name]}, {config}: {watched} {values[0]:.3f} at epoch 1, best {min(values):.4f} at epoch "
            f"{best}, {values[-1]:.4f} at the last; {checked}"
            + (f"; stalled flagged on {len(stalled)} epochs (first {stalled[0]}), converged on {len(converged)}, last "
               f"smallest/largest curvature {curvature:.2g}" if epochs else "")
            + f"; final training accuracy {history['accuracy'][-1]:.3f}")
    return lines


def interpretation(all_rows, all_histories, profiles, all_runs):
    lines = []
    for model_name, rows in all_rows.items():
        main, worst = rows["monitor"], rows["monitor aggressive"]
        plain = rows["plain"]["median"]
        plain_fits = [fit for fit, _, _ in all_runs[model_name]["plain"]]
        spread = (max(plain_fits) - min(plain_fits)) / plain
        lines.append(
            f"- **{TITLES[model_name]}** ({EPOCHS[model_name]} epochs, batch {BATCH_SIZE[model_name]}, plain fit "
            f"{plain:.2f} s, {1000 * plain / EPOCHS[model_name]:.0f} ms per epoch): at defaults the ratio of fit "
            f"medians is {main['ratio']:.3f} ({main['ratio'] - 1:+.1%}), measured directly {main['direct']:.1%} "
            f"({main['inside']:.2f} s inside the monitor, {main['checks']:g} analyses per fit): "
            f"**{verdict('monitor', main)}**. Worst case (aggressive: min_delta 0.05, patience 1): ratio {worst['ratio']:.3f} "
            f"({worst['ratio'] - 1:+.1%}), directly {worst['direct']:.1%}, {worst['checks']:g} analyses per fit"
            + (f" at a median {worst['per_check']:.2f} s each" if worst["per_check"] is not None else "")
            + f". The {REPEATS} plain fits span {min(plain_fits):.2f} to {max(plain_fits):.2f} s ({spread:.0%} of "
            "their median)" + (f", not less than the {LIMIT:.0%} limit: fit ratios alone cannot settle it"
                               if spread >= LIMIT else "") + ".")
        lines += [f"- {line}." for line in what_it_saw(model_name, all_histories[model_name], rows)]
        calls, parts, hvps = profiles[model_name]
        ordered = sorted(parts.items(), key=lambda item: -item[1])
        named = "; ".join(f"{PARTS[name]} {seconds:.2f} s" for name, seconds in ordered)
        lines.append(
            f"- Where an analysis's time goes ({TITLES[model_name]}, {PROFILED} calls of `_analyse(curvature=True)` "
            f"on the last model trained with the aggressive monitor, under cProfile, so with its overhead): "
            f"{', '.join(f'{seconds:.2f}' for seconds in calls)} s (the first builds and traces); per call, the "
            f"parts (they overlap where one calls another): {named}. Timed alone, three Hessian-vector products of a "
            f"new `ProbeLoss` (the monitor makes one per fit, at `on_train_begin`) take "
            f"{', '.join(f'{seconds:.3f}' for seconds in hvps)} s: the first traces.")
    lines.append(
        "- At defaults the monitor analyses only on a plateau of the training loss, and a cross-entropy that is "
        "driven towards zero keeps improving by more than the relative `min_delta` (1e-3), so a monitor that never "
        "analyses costs only its bookkeeping (reading the weights once and building the probe model at "
        "`on_train_begin`, a comparison per epoch). The aggressive worst case shows what each analysis costs when plateaus do "
        "come; the direct figure counts only time inside the monitor's hooks (wall clock, so it too grows under "
        "load) and is the one to trust for the cost.")
    return "\n".join(lines)


def write_results(all_rows, all_histories, profiles, all_runs, loads):
    text = f"""## EmbeddingMonitor overhead (benchmarks/bench_callbacks.py)

Generated by `make bench` (`.venv/bin/python benchmarks/bench_callbacks.py`) on {datetime.datetime.now().isoformat(timespec="seconds")}.

Machine: {machine()}. 1-minute load average {loads[0]} before the run, {loads[1]} after it
(the machine is shared; a load near or above nproc means other processes took cores during the run).

### What is measured
Requirement (issue 18): at its defaults `EmbeddingMonitor` costs at most {LIMIT:.0%} of fit time on the MNIST-1D
40-512-512-10 MLP and on a small residual CNN, measured with interleaved runs (ratio of fit times).

- **MNIST-1D MLP**: Dense 512 relu, Dense 512 relu, Dense 10 logits; the 4000 x 40 training rows of MNIST-1D
  (`mnist1d.data.make_dataset(get_dataset_args())`, generated offline); batch {BATCH_SIZE['mnist1d']} (32 steps per epoch), {EPOCHS['mnist1d']} epochs.
- **digits residual CNN**: Conv2D(32, 3, same, relu), two residual blocks (Conv-BN-relu-Conv-BN, Add, relu),
  GlobalAveragePooling2D, Dense 10 logits; sklearn's 8x8 digits (`bundled_dataset("digits")` as (n, 8, 8, 1)),
  1437 training rows (a seeded split holds 360 out, unused here); batch {BATCH_SIZE['digits_cnn']} (23 steps per epoch),
  {EPOCHS['digits_cnn']} epochs.

Both with new weights from `keras.utils.set_random_seed(0)` (every fit starts from the same weights), Adam, sparse
categorical cross-entropy from logits, `verbose=0`, in one process, in three configurations:

- **plain**: no callback;
- **monitor**: `EmbeddingMonitor(probe_x, probe_y)` at its defaults (monitor "loss", patience 5, relative min_delta
  1e-3, action "warn"), probe = {PROBE} training rows (seeded choice without repeats) with their labels; the
  configuration the requirement is judged on, against plain;
- **monitor aggressive**: `EmbeddingMonitor(probe_x, probe_y, min_delta=0.05, patience=1)`: every epoch in which the
  training loss falls by less than 5% of its best is a plateau, so the plateau test fires often (the monitor's
  back-off spaces repeated checks on one plateau); a worst case, reported and not required. (A val_loss monitor no
  longer serves as one: the monitor does not analyse a val_loss plateau while the training loss still falls.)

A fit is timed from the `fit` call to its return (wall clock, `time.perf_counter`); building and compiling the model
are outside. The monitor is a subclass that only adds timers around `on_train_begin`, `on_epoch_end` and `_analyse`
(one redundancy analysis, plus on a plateau check a 20-step Lanczos curvature check on 256 probe rows), so the
time spent inside it and the analyses it ran are known. One {WARMUP_EPOCHS}-epoch warm-up fit per configuration,
then {REPEATS} rounds fit every configuration once each, the order rotated every round (interleaved; {REPEATS}
rounds, not more, to keep this benchmark under about 10 minutes). Fit ratio = median monitored fit / median plain fit
(in brackets the same with the fastest fits); monitor time / reference fit = median time inside the
monitor / median plain fit (the overhead measured directly). The default configuration passes when the fit
ratio is at most {1 + LIMIT:.2f} and the direct figure at most {LIMIT:.0%} (fit times alone can pass or fail by noise
on this machine). Last, {PROFILED} calls of the monitor's `_analyse` on each trained model run under cProfile, to
say where an analysis's time goes.

### Results
{table(all_rows)}

### Interpretation
{interpretation(all_rows, all_histories, profiles, all_runs)}
"""
    write_section("callbacks", text)


def main():
    logging.getLogger("keras_embed.callbacks").setLevel(logging.ERROR)  # the one-line stall warning
    started = time.perf_counter()
    before = load()
    print(machine(), "| load average", before, flush=True)
    data = datasets()
    all_runs, all_rows, all_histories, profiles = {}, {}, {}, {}
    for model_name in MODELS:
        runs, histories, trained = measure(model_name, data[model_name])
        all_runs[model_name], all_histories[model_name] = runs, histories
        all_rows[model_name] = summarize(runs)
        profiles[model_name] = profile(trained, *data[model_name][4:])
        calls, parts, hvps = profiles[model_name]
        print(f"{model_name} profile: analyses {', '.join(f'{seconds:.2f}' for seconds in calls)} s;",
              f"HVPs of a new ProbeLoss {', '.join(f'{seconds:.3f}' for seconds in hvps)} s;",
              ", ".join(f"{name} {seconds:.2f} s" for name, seconds in parts.items()), flush=True)
    after = load()
    print(table(all_rows))
    print("load average after the run", after)
    write_results(all_rows, all_histories, profiles, all_runs, (before, after))
    print(f"wrote benchmarks/RESULTS.md (section callbacks) after {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

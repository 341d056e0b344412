"""Crash-safe output and bounded memory.

Writes: real child processes are killed (SIGKILL) in the middle of `save_model`, once
paused inside the writer of every format and once at a few delays into real, large
writes; the target must then be the old complete model or absent, never partial, and what
is left beside it must be a hidden `.NAME.PID.tmp...` entry. Two processes writing the same
targets at once must both succeed and leave one complete model.

Memory: the statistics' Gram matrix of [a, 1] grows with the square of the width (512 MiB
for 8,192 units); such a pass is refused before anything is allocated, while the passes
without a Gram (exact mode) run on it.
"""

import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from builders import make_mlp
from keras_embed import prune, read_model, stats
from keras_embed.errors import InputError
from keras_embed.rules import Rule
from keras_embed.stats import GRAM_BUDGET, check_gram_memory, collect, gram_bytes
from keras_embed.tools.cli import main

PRELUDE = """
import os, sys, threading, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
from keras_embed import io

def constant_model(width, value, depth=1):
    dense = [keras.layers.Dense(width, kernel_initializer=keras.initializers.Constant(value)) for _ in range(depth)]
    return keras.Sequential([keras.Input((width,)), *dense, keras.layers.Dense(2)])
"""
PAUSED_WRITES = PRELUDE + """
folder, = sys.argv[1:]
model, real, started = constant_model(4, 1.0), dict(io._WRITERS), threading.Semaphore(0)

def paused(format):
    def write(model, path):
        real[format](model, path)                       # the real writer fills the temporary path,
        if os.path.isfile(path):
            os.truncate(path, os.path.getsize(path) // 2)   # which is cut to half a model,
        started.release()
        threading.Event().wait()                        # and the process is killed before the rename
    return write

io._WRITERS.update({format: paused(format) for format in io.FORMATS})
targets = sys.stdin.read().split()
for target in targets:
    threading.Thread(target=io.save_model, args=(model, f"{folder}/{target}"), daemon=True).start()
    started.acquire()  # one writer at a time: the TensorFlow writers are not thread-safe
print("paused", flush=True)
time.sleep(600)
"""
ENDLESS_WRITES = PRELUDE + """
target, = sys.argv[1:]
model = constant_model(1536, 0.001, depth=3)            # 28 MB of weights
io.save_model(model, target)
print("writing", flush=True)
while True:
    io.save_model(model, target)
"""
RACING_WRITES = PRELUDE + """
folder, value = sys.argv[1], float(sys.argv[2])
model = constant_model(4, value)
print("ready", flush=True)
while not os.path.exists(f"{folder}/go"):
    time.sleep(0.01)
for _ in range(2):
    for target in ("model.keras", "model.h5", "export/"):
        io.save_model(model, f"{folder}/{target}")
"""
FILE_TARGETS = ("model.keras", "model.h5", "model.tflite")
EXPORT = "export"


def child(script, *args):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process, line):
    """Reads the child's stdout up to `line`; fails with its stderr if it ends first."""
    for got in process.stdout:
        if got.strip() == line:
            return
    pytest.fail(f"child ended before '{line}': {process.wait()}\n{process.stderr.read()[-3000:]}")


def temporaries(folder, targets):
    """Entries of `folder` besides `targets`; each must be a hidden temporary of one of them."""
    left = sorted(set(os.listdir(folder)) - set(targets))
    pattern = re.compile(rf"^\.({'|'.join(map(re.escape, targets))})\.\d+\.tmp(\.keras|\.h5|\.tflite)?$")
    assert all(pattern.match(name) for name in left), f"unexpected leftovers in {folder}: {left}"
    return left


# ---------------------------------------------------------------- killed writers


def test_a_writer_killed_inside_any_format_leaves_the_old_model_or_none(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    for name in FILE_TARGETS:
        (old / name).write_bytes(f"the old, complete {name}".encode())
    (old / EXPORT).mkdir()
    (old / EXPORT / "saved_model.pb").write_bytes(b"the old, complete export")
    before = {name: (old / name).read_bytes() for name in FILE_TARGETS}
    targets = [*FILE_TARGETS, f"{EXPORT}/"]

    process = child(PAUSED_WRITES, tmp_path)
    process.stdin.write(" ".join(f"{folder}/{target}" for folder in ("new", "old") for target in targets))
    process.stdin.close()
    wait_for(process, "paused")
    process.kill()
    assert process.wait() == -9

    assert sorted(os.listdir(new)) == sorted(f".{name}.{process.pid}.tmp{os.path.splitext(name)[1]}"
                                             for name in [*FILE_TARGETS, EXPORT])  # no target, hidden halves
    temporaries(old, [*FILE_TARGETS, EXPORT])
    assert {name: (old / name).read_bytes() for name in FILE_TARGETS} == before
    assert os.listdir(old / EXPORT) == ["saved_model.pb"]
    assert (old / EXPORT / "saved_model.pb").read_bytes() == b"the old, complete export"


def test_writers_killed_at_random_points_of_real_writes_leave_a_complete_model(tmp_path):
    kills = [("model.keras", 0.05), ("model.h5", 0.3), ("model.keras", 0.7)]  # (target, seconds into the writes)
    folders = [tmp_path / f"{index}" for index in range(len(kills))]
    processes = []
    for folder, (name, _) in zip(folders, kills):
        folder.mkdir()
        processes.append(child(ENDLESS_WRITES, folder / name))

    def kill_after(process, delay):
        wait_for(process, "writing")
        time.sleep(delay)
        process.kill()
        process.wait()

    threads = [threading.Thread(target=kill_after, args=(process, delay)) for process, (_, delay) in zip(processes, kills)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    left = [temporaries(folder, [name]) for folder, (name, _) in zip(folders, kills)]
    for folder, (name, _) in zip(folders, kills):  # loads (so it is complete) and holds the model's weights
        loaded = keras.saving.load_model(folder / name, compile=False)
        assert len(loaded.layers) == 4
        for layer in loaded.layers[:3]:
            np.testing.assert_array_equal(layer.get_weights()[0], np.full((1536, 1536), 0.001, dtype="float32"))
    assert any(left), "no kill landed inside a write; the test proved nothing"


def test_two_processes_writing_the_same_targets_leave_one_complete_model_each(tmp_path):
    processes = [child(RACING_WRITES, tmp_path, value) for value in (1.0, 2.0)]
    for process in processes:
        wait_for(process, "ready")
    (tmp_path / "go").touch()
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]

    assert sorted(os.listdir(tmp_path)) == ["export", "go", "model.h5", "model.keras"]  # no temporaries, no .old
    for name in ("model.keras", "model.h5"):
        kernel = keras.saving.load_model(tmp_path / name, compile=False).layers[0].get_weights()[0]
        assert np.unique(kernel).tolist() in ([1.0], [2.0]), f"{name} mixes both writers"
    exported = tf.saved_model.load(str(tmp_path / "export"))
    served = exported.serve(tf.ones((1, 4))).numpy()
    assert np.all(np.isfinite(served))


# ---------------------------------------------------------------- memory of the statistics


@pytest.fixture(scope="module")
def wide_graph():
    """1 input -> 8192 relu units -> 1 output: a 512 MiB Gram, 25k weights."""
    return read_model(make_mlp([8192, 1], inputs=1, seed=0))


def test_gram_budget_figures():
    assert gram_bytes(8192) == 8 * 8193**2 > 512 * 2**20
    assert gram_bytes(5791) <= GRAM_BUDGET < gram_bytes(5792)


def test_a_pass_with_a_gram_too_large_is_refused_before_allocating(wide_graph):
    x = np.ones((4, 1), "float32")
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as raised:
            collect(wide_graph, x, gram=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(raised.value)
    assert all(word in message for word in ("'hidden_0'", "8192 units", "512 MiB", "256 MiB", "--batch-size",
                                            "--mode exact"))
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_the_library_refuses_data_mode_on_the_wide_layer_before_any_pass():
    model = make_mlp([8192, 1], inputs=1, seed=0)
    x = np.ones((4, 1), "float32")
    with pytest.raises(InputError, match="8192 units"):
        prune(model, data=x, mode="data", rule=Rule("keep_ratio", 0.5))


def test_the_budget_counts_every_gram_held_at_once():
    layers = [SimpleNamespace(name=f"hidden_{index}", width=5000) for index in range(2)]  # 191 MiB each
    check_gram_memory(layers[:1])
    with pytest.raises(InputError, match="382 MiB"):
        check_gram_memory(layers)


def test_statistics_without_a_gram_run_on_the_wide_layer(wide_graph):
    x = np.linspace(-1.0, 1.0, 16, dtype="float32")[:, None]
    result = collect(wide_graph, x, batch_size=8, gram=False)
    assert result.layers["hidden_0"].gram is None
    assert result.layers["hidden_0"].count == 16


def test_the_gram_accumulated_in_row_blocks_equals_the_whole_product(monkeypatch):
    monkeypatch.setattr(stats, "_GRAM_BLOCK", 3)
    a = np.random.default_rng(0).standard_normal((50, 10))
    layer = stats.LayerStats(10, np.zeros((11, 11)))
    layer.update(a, a)
    layer.update(a[:7], a[:7])
    augmented = np.column_stack([np.vstack([a, a[:7]]), np.ones(57)])
    np.testing.assert_allclose(layer.gram, augmented.T @ augmented, rtol=1e-12)


def test_prune_in_exact_mode_handles_the_wide_layer(tmp_path):
    model = tmp_path / "wide.keras"
    make_mlp([8192, 1], inputs=1, seed=0).save(model)
    result = CliRunner().invoke(main, ["prune", str(model), "-o", str(tmp_path / "out.keras")])
    assert result.exit_code == 0, result.output
    assert keras.saving.load_model(tmp_path / "out.keras").count_params() > 0

"""The statistics passes on tf.distribute: two and four logical CPU devices and two local
workers give the one-device figures, and `prune --mode data` the same pruned model.

Each strategy runs in processes of its own (`distributed_pass.py`): logical devices must
be set before TensorFlow starts, and a multi-worker strategy needs one process per worker.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_embed.tools.cli import main

PASS = Path(__file__).with_name("distributed_pass.py")
# float64 models compute as exactly as the float64 accumulation; a float32 forward pass
# rounds differently on a replica's shorter batch (about 1e-7 of each value)
STATISTICS = {"float64": 1e-12, "float32": 1e-6}
OUTPUTS = {"float64": 1e-5, "float32": 1e-4}  # pruned models: rounding may pick another, as good, unit


def _run(arguments, out, env=None):
    return subprocess.Popen([sys.executable, str(PASS), *arguments[:1], str(out), *arguments[1:]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(process, out):
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-3000:]
    return json.loads(out.read_text())


def _check(results, replicas):
    assert results
    for name, figures in results.items():
        dtype = name.rsplit("_", 1)[1]
        assert figures["replicas"] == replicas
        assert figures["keys"] > 50, name  # every statistic of every layer came back
        assert figures["statistics"] <= STATISTICS[dtype], (name, figures)
        assert figures["pruned_shapes"], name
        assert figures["pruned_outputs"] <= OUTPUTS[dtype], (name, figures)


@pytest.mark.parametrize("devices, dtypes", [(2, ["float64"]), (4, ["float64", "float32"])])
def test_statistics_on_logical_devices_equal_the_one_device_pass(tmp_path, devices, dtypes):
    out = tmp_path / "figures.json"
    _check(_finished(_run([str(devices), *dtypes], out), out), devices)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for item in sockets:
        item.bind(("127.0.0.1", 0))
    ports = [item.getsockname()[1] for item in sockets]
    for item in sockets:
        item.close()
    return ports


def test_statistics_on_two_local_workers_equal_the_one_device_pass(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    outs = [tmp_path / f"worker{index}.json" for index in range(2)]
    processes = [_run(["worker", "float64"], out, dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": index}}))) for index, out in enumerate(outs)]
    for process, out in zip(processes, outs):
        _check(_finished(process, out), 2)


def test_cli_strategy_mirrored_gives_the_model_without_it(tmp_path, saved_models):
    runner, reports = CliRunner(), []
    for strategy in ("default", "mirrored"):
        report = tmp_path / f"{strategy}.json"
        result = runner.invoke(main, ["prune", str(saved_models / "digits_widened.keras"), "-o",
                                      str(tmp_path / f"{strategy}.keras"), "--dataset", "digits", "--mode", "data",
                                      "--keep-ratio", "0.5",
                                      "--strategy", strategy, "--report", str(report)])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(report.read_text()))
    assert "strategy" not in reports[0]
    assert reports[1]["strategy"] == {"kind": "mirrored", "replicas": 1}  # no GPU here: the CPU
    assert [row["width_after"] for row in reports[0]["layers"]] == [row["width_after"] for row in reports[1]["layers"]]
    assert reports[0]["output_error"] == pytest.approx(reports[1]["output_error"], rel=1e-6)


def test_cli_multi_worker_without_tf_config_is_refused(saved_models, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(main, ["analyze", str(saved_models / "digits_widened.keras"), "--dataset", "digits",
                                       "--strategy", "multi-worker"])
    assert result.exit_code == 2
    assert "needs TF_CONFIG" in result.output and "Traceback" not in result.output


def test_cli_device_is_recorded_and_a_missing_gpu_refused(tmp_path, saved_models):
    model = str(saved_models / "digits_widened.keras")
    result = CliRunner().invoke(main, ["analyze", model, "--dataset", "digits", "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    gpus = len(tf.config.list_physical_devices("GPU"))
    assert json.loads(result.stdout)["device"] == {"requested": "cpu", "used": "/CPU:0", "gpus_visible": gpus}
    if not gpus:
        refused = CliRunner().invoke(main, ["prune", model, "-o", str(tmp_path / "out.keras"), "--device", "gpu"])
        assert refused.exit_code == 2 and "sees no GPU here" in refused.output
    both = CliRunner().invoke(main, ["analyze", model, "--device", "cpu", "--strategy", "mirrored"])
    assert both.exit_code == 2 and "give one of them" in both.output
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("command", [
    ["embed", "{model}", "-o", "{out}", "--widen", "0:0"],
    ["hessian", "{model}", "--dataset", "digits", "--loss", "sparse_categorical_crossentropy", "--top-k", "1"],
    ["experiment", "condensation", "-o", "{out}", "--seeds", "1", "--epochs", "10", "--task", "1d"],
    ["experiment", "strict-saddle", "-o", "{out}"],
    ["experiment", "bn-ablation", "-o", "{out}", "--quick"],
])
def test_every_command_that_computes_takes_device(tmp_path, saved_models, command):
    model = str(saved_models / "digits_narrow.keras")
    filled = [part.format(model=model, out=tmp_path / "out") for part in command]
    assert "--device" in CliRunner().invoke(main, [*filled[:2 if filled[0] == "experiment" else 1], "--help"]).output
    if not tf.config.list_physical_devices("GPU"):
        refused = CliRunner().invoke(main, [*filled, "--device", "gpu"])
        assert refused.exit_code == 2 and "sees no GPU here" in refused.output, refused.output
        assert not (tmp_path / "out").exists()


def test_hessian_records_the_device_it_ran_on(saved_models):
    result = CliRunner().invoke(main, ["hessian", str(saved_models / "digits_narrow.keras"), "--dataset", "digits",
                                       "--loss", "sparse_categorical_crossentropy", "--top-k", "1", "--trace-samples",
                                       "2", "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["device"]["used"] == "/CPU:0"

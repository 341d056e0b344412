"""The BatchNormalization and data-size experiments: training loop, metric, files, CLI."""

import csv
import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_embed.experiments import report
from keras_embed.experiments.bn_ablation import Comparison, bn_ablation, resolve_device
from keras_embed.experiments.training import Run, Settings, build_mlp, linear_fractions, load_task, train
from keras_embed.model.read import read_model
from keras_embed.tools.cli import main

RESULT_KEYS = {"experiment", "task", "config", "versions", "device", "details", "runs", "summary"}
RUN_KEYS = {"seed", "steps", "loss", "checkpoint_steps", "linear_fraction", "linearized_layers"}
TINY = dict(depth=2, width=8, steps=20, record_every=5, checkpoints=2, seeds=(0,), probe_size=64)


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def _is_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    return height > 100 and width > 100


@pytest.mark.parametrize("command, variants", [
    (["bn-ablation"], {"without_bn", "with_bn"}),
    (["experiment", "data-size"], {"n=180", "n=449", "n=898", "n=1797"}),
])
def test_quick_run_writes_every_documented_file(tmp_path, command, variants):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*command, "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == sorted(report.FILES)
    document = json.loads((out / "results.json").read_text())
    assert set(document) == RESULT_KEYS
    assert set(document["runs"]) == variants == set(document["summary"]["variants"])
    assert document["device"]["used"] == "/CPU:0" and document["config"]["seeds"] == [0, 1]
    for runs in document["runs"].values():
        assert [run["seed"] for run in runs] == [0, 1]
        assert all(set(run) == RUN_KEYS and len(run["loss"]) == 20 and len(run["linear_fraction"]) == 5 for run in runs)
    with (out / "curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["variant"] for row in rows} == variants
    assert len(rows) == len(variants) * 2 * 21  # 20 loss records + the checkpoint at step 0
    assert all(_is_png(out / name) for name in ("loss.png", "linear_fraction.png"))
    assert "| metric |" in (out / "summary.md").read_text() and "| metric |" in result.output


def test_batch_norm_speeds_up_the_quick_digits_run(tmp_path, digits):
    """The quick preset's measured outcome (see docs/bn_ablation.md): with BN the loss is
    lower at every quarter of training and no unit ends in a linear regime."""
    comparison = bn_ablation(digits, Settings.quick(), device="cpu")
    summary = report.summarize(comparison)["variants"]
    for metric in ("loss_at_25pct", "loss_at_50pct", "loss_at_100pct", "log10_loss_area"):
        assert summary["with_bn"][metric]["mean"] < summary["without_bn"][metric]["mean"]
    assert summary["with_bn"]["mean_linear_fraction"]["mean"] < summary["without_bn"]["mean_linear_fraction"]["mean"]


def test_same_seed_gives_the_same_curves_on_cpu(digits):
    settings = Settings(**TINY)
    first, second = (train(build_mlp(settings, digits, True, 7), digits, settings, 7) for _ in range(2))
    np.testing.assert_array_equal(first.loss, second.loss)
    np.testing.assert_array_equal(first.linear_fraction, second.linear_fraction)
    other = train(build_mlp(settings, digits, True, 8), digits, settings, 8)
    assert not np.array_equal(first.loss, other.loss)


def test_with_and_without_batch_norm_start_from_the_same_dense_weights(digits):
    settings = Settings(**TINY)
    plain, normalized = (build_mlp(settings, digits, batch_norm, seed=3) for batch_norm in (False, True))
    dense = [[layer.get_weights() for layer in model.layers if isinstance(layer, keras.layers.Dense)] for model in (plain, normalized)]
    for left, right in zip(*dense):
        for a, b in zip(left, right):
            np.testing.assert_array_equal(a, b)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in normalized.layers) == settings.depth


def _relu_mlp(kernels, biases):
    model = keras.Sequential([keras.Input((kernels[0].shape[0],))] + [
        keras.layers.Dense(kernel.shape[1], activation="relu" if index < len(kernels) - 1 else None)
        for index, kernel in enumerate(kernels)
    ])
    for layer, kernel, bias in zip(model.layers, kernels, biases):
        layer.set_weights([kernel, bias])
    return model


def test_linear_fraction_is_one_exactly_when_every_unit_is_linear_on_the_data(digits):
    rng = np.random.default_rng(0)
    shapes = [(64, 12), (12, 9), (9, 10)]
    positive = _relu_mlp([rng.uniform(0.0, 1.0, shape) for shape in shapes], [np.full(shape[1], 0.1) for shape in shapes])
    assert linear_fractions(read_model(positive), digits.x[:300]) == [1.0, 1.0]  # every z > 0 on inputs in [0, 1]
    mixed = _relu_mlp([rng.normal(size=shape) for shape in shapes], [np.zeros(shape[1]) for shape in shapes])
    fractions = linear_fractions(read_model(mixed), digits.x[:300])
    assert all(fraction < 1.0 for fraction in fractions)


def test_the_metric_counts_a_linearized_layer_through_batch_norm(digits):
    """A BN-folded layer is measured in inference mode: a huge beta pushes every unit positive."""
    settings = Settings(**TINY)
    model = build_mlp(settings, digits, True, 0)
    model.get_layer("bn_1").beta.assign(np.full(settings.width, 1e3, np.float32))
    assert linear_fractions(read_model(model), digits.x[:200])[1] == 1.0


def _run(seed, loss, fractions):
    loss = np.asarray(loss, float)
    return Run(seed, np.arange(1, len(loss) + 1) * 10, loss, np.array([0, 20, 40]), np.asarray(fractions, float))


def test_summary_metrics_follow_the_curves():
    fast = [_run(0, [1.0, 0.05, 0.005, 0.0005], [[0, 0], [0, 0], [0, 0]]), _run(1, [1.0, 0.2, 0.009, 0.002], [[0, 0], [0, 0], [0, 0]])]
    slow = [_run(0, [1.0, 0.9, 0.8, 0.7], [[0, 0], [1, 1], [1, 0.5]])]
    comparison = Comparison("bn_ablation", "toy", Settings(seeds=(0, 1)), {"fast": fast, "slow": slow}, {})
    summary = report.summarize(comparison)
    assert summary["start_loss"] == 1.0
    assert summary["variants"]["fast"]["steps_to_0.1x_start"] == {"mean": 25.0, "std": 5.0, "seeds": 2}
    assert summary["variants"]["fast"]["steps_to_0.001x_start"] == {"mean": 40.0, "std": 0.0, "seeds": 1}
    assert summary["variants"]["slow"]["steps_to_0.1x_start"]["mean"] is None
    assert summary["variants"]["slow"]["loss_at_50pct"]["mean"] == 0.9
    assert summary["variants"]["slow"]["mean_linear_fraction"]["mean"] == 0.875
    assert summary["variants"]["slow"]["max_linearized_layers"]["mean"] == 2
    table = report.summary_table(comparison, summary)
    assert "25 ± 5" in table and "not reached" in table and "(1/2 seeds)" in table


def test_regression_task_trains_with_mse():
    task = load_task("regression1d")
    assert task.classes == 0 and task.outputs == 1
    settings = Settings(**{**TINY, "activation": "tanh", "steps": 60, "learning_rate": 0.1})
    run = train(build_mlp(settings, task, False, 0), task, settings, 0)
    assert run.loss[-1] < run.loss[0]


def test_npz_data_with_integer_and_float_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 3)), y=np.array([0, 2, 1, 0, 2]))
    assert load_task(str(path)).classes == 3
    np.savez(path, x=np.ones((5, 3)), y=np.ones(5))
    assert load_task(str(path)).outputs == 1


def test_device_choice_is_recorded():
    name, record = resolve_device("auto")
    assert name in ("/CPU:0", "/GPU:0") and record["requested"] == "auto" and "tensorflow" in record["versions"]
    assert resolve_device("cpu")[0] == "/CPU:0"


def _invoke(*args):
    return CliRunner().invoke(main, ["bn-ablation", *args])


def _no_x_y(tmp_path):
    path = tmp_path / "x_only.npz"
    np.savez(path, x=np.ones((4, 2)))
    return ["--data", str(path)]


@pytest.mark.parametrize("args, message", [
    (["--depth", "0"], "depth must be at least 1"),
    (["--steps", "5", "--record-every", "10"], "record-every (10) exceeds steps (5)"),
    (["--learning-rate", "-1"], "learning-rate must be positive"),
    (["--seeds", "0"], "must be at least 1"),
    (["--data", "missing.npz"], "not found"),
    (_no_x_y, "has no labels"),
    (["--dataset", "iris", "--data", "x.npz"], "not both"),
    (["--mixed-precision", "--device", "cpu"], "needs a GPU"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, args, message):
    args = args(tmp_path) if callable(args) else args
    result = _invoke("--quick", *args, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_fractions_outside_the_unit_interval_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["data-size", "--quick", "--fractions", "0,1.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "(0, 1]" in result.output
    assert not (tmp_path / "out").exists()


def test_gpu_requested_without_one_exits_2(tmp_path):
    if resolve_device("auto")[0] == "/GPU:0":
        pytest.skip("this machine has a GPU")
    result = _invoke("--quick", "--device", "gpu", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "sees no GPU" in result.output


def test_existing_output_is_kept_unless_overwrite(tmp_path, digits):
    comparison = bn_ablation(digits, Settings(**TINY), device="cpu")
    out = tmp_path / "out"
    report.write(comparison, out)
    before = (out / "results.json").read_bytes()
    with pytest.raises(ValueError, match="--overwrite"):
        report.write(comparison, out)
    assert (out / "results.json").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier result folder"):
        report.write(comparison, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert report.write(comparison, out, overwrite=True) == list(report.FILES)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left


def test_cli_dataset_choices_match_the_library():
    """tools/common.py repeats keras_embed.files.data.DATASETS so --help needs no keras import."""
    from keras_embed.files.data import DATASETS as library
    from keras_embed.tools.common import DATASETS as cli

    assert list(library) == list(cli)

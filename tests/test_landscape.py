"""The taxonomy paper's global metrics (issue 22): CKA, weight distance, the linear path, the
Bézier curve and mode connectivity, unit alignment, and `keras-embed landscape`."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_embed.edit.operators import permute
from keras_embed.files.data import bundled_dataset
from keras_embed.hessian import get_loss
from keras_embed.landscape.align import align
from keras_embed.landscape.compare import compare_models
from keras_embed.landscape.paths import Evaluator, barrier, distance, linear_path, mode_connectivity, values
from keras_embed.landscape.similarity import features, linear_cka
from keras_embed.model.build import build_model
from keras_embed.model.read import read_model
from keras_embed.tools.cli import main

LOSS = "sparse_categorical_crossentropy"


def _hsic_cka(x, y):
    """CKA from centred Gram matrices, tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)): the definition."""
    n = len(x)
    centre = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ centre @ b @ centre)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_is_the_hsic_definition_and_one_for_rotated_or_scaled_features():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 6)), rng.standard_normal((40, 3))
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-10)
    rotation = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-12)
    assert 0 <= linear_cka(x, y) < 1


@pytest.fixture(scope="module")
def digits_models():
    """Three 64-24-24-10 relu MLPs trained on 600 digits with seeds 0, 1, 2, and the rows."""
    x, y = bundled_dataset("digits")
    x, y = x[:600], y[:600]
    models = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(24, activation="relu", name="hidden"),
                                  keras.layers.Dense(24, activation="relu", name="second"),
                                  keras.layers.Dense(10, name="logits")], name=f"seed{seed}")
        model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=15, batch_size=64, verbose=0)
        models.append(model)
    return models, x, y


def _permuted(model, seed=1):
    graph, rng = read_model(model), np.random.default_rng(seed)
    for layer in ("hidden", "second"):
        graph = permute(graph, layer, rng.permutation(24))
    return build_model(graph)


def test_a_model_and_its_permuted_copy_have_cka_one_on_outputs_and_on_the_permuted_layer(digits_models):
    (model, *_), x, _ = digits_models
    copy = _permuted(model)
    ours, theirs = features(model, x, ["hidden"]), features(copy, x, ["hidden"])
    assert not np.allclose(ours["hidden"], theirs["hidden"])  # the units are in another order
    assert linear_cka(ours["hidden"], ours["hidden"]) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(ours["output"], theirs["output"]) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(ours["hidden"], theirs["hidden"]) == pytest.approx(1.0, abs=1e-6)


def test_distance_and_linear_barrier_of_a_model_with_itself_are_zero(digits_models):
    (model, *_), x, y = digits_models
    path = linear_path(Evaluator(model, x, y, get_loss(LOSS, True)), values(model), values(model))
    assert distance(values(model), values(model)) == 0.0
    assert barrier([point["loss"] for point in path]) == pytest.approx(0.0, abs=1e-6)
    assert mode_connectivity([point["error"] for point in path]) == 0.0


def test_after_alignment_a_permuted_copy_is_at_distance_zero_with_no_linear_barrier(digits_models):
    (model, *_), x, y = digits_models
    copy = _permuted(model)
    assert distance(values(model), values(copy)) > 1.0
    first, second, matched = align(model, copy, x)
    assert distance(values(first), values(second)) == pytest.approx(0.0, abs=1e-5)
    path = linear_path(Evaluator(first, x, y, get_loss(LOSS, True)), values(first), values(second))
    assert barrier([point["loss"] for point in path]) == pytest.approx(0.0, abs=1e-5)
    assert all(0.5 < correlation <= 1 + 1e-9 for correlation in matched.values())  # units dead on x correlate 0 after relu


def test_the_bezier_curve_to_a_permuted_copy_connects_better_than_the_straight_line(digits_models):
    (model, *_), x, y = digits_models
    pair = compare_models([model, _permuted(model)], x, y, LOSS, from_logits=True, curve_epochs=10,
                          trace_samples=2)["pairs"][0]
    assert pair["linear"]["mc"] < -1.0  # permuted units: a barrier on the straight line
    assert pair["bezier"]["mc"] >= pair["linear"]["mc"]


def test_path_figures_are_a_direct_numpy_forward_pass_at_the_interpolated_weights(digits_models):
    """Loss and error at t = 0.5 equal those of numpy's relu MLP at the averaged weights; the
    mc and barrier formulas are the paper's on a hand-made path."""
    (first, second, _), x, y = digits_models
    path = linear_path(Evaluator(first, x, y, get_loss(LOSS, True)), values(first), values(second), points=3)
    w = [(a + b) / 2 for a, b in zip(values(first), values(second))]
    hidden = np.maximum(np.maximum(x @ w[0] + w[1], 0) @ w[2] + w[3], 0)
    logits = hidden @ w[4] + w[5]
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y])
    assert path[1]["t"] == 0.5
    assert path[1]["loss"] == pytest.approx(loss, rel=1e-4)
    assert path[1]["error"] == pytest.approx(100 * np.mean(logits.argmax(axis=1) != y))
    assert mode_connectivity([2.0, 10.0, 30.0, 6.0, 4.0]) == 3.0 - 30.0
    assert barrier([1.0, 3.0, 2.0]) == pytest.approx(3.0 - 1.5)
    assert distance(values(first), values(second)) == pytest.approx(
        np.linalg.norm(np.concatenate([(a - b).ravel() for a, b in zip(values(first), values(second))])))


def test_cli_landscape_on_three_seeds_writes_every_metric_and_the_plot(digits_models, tmp_path):
    models, x, y = digits_models
    paths = []
    for model in models:
        paths.append(str(tmp_path / f"{model.name}.keras"))
        model.save(paths[-1])
    np.savez(tmp_path / "train.npz", x=x, y=y)
    result = CliRunner().invoke(main, ["landscape", *paths, "--data", str(tmp_path / "train.npz"), "--loss", LOSS,
                                       "--from-logits", "--align", "--layer", "hidden", "--curve-epochs", "3",
                                       "--trace-samples", "3", "--hessian-rows", "100", "--points", "3",
                                       "--json", str(tmp_path / "l.json"),
                                       "--plot", str(tmp_path / "l.png")])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "l.json").read_text())
    assert [row["path"] for row in figures["models"]] == paths
    assert all(row["hessian_top"] > 0 and row["hessian_trace"] > 0 for row in figures["models"])
    assert [(pair["first"], pair["second"]) for pair in figures["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    for pair in figures["pairs"]:
        assert 0 < pair["cka_output"] <= 1 and set(pair["cka"]) == {"hidden"}
        assert pair["aligned"]["distance"] < pair["distance"]  # matching units brings the seeds closer
        assert len(pair["linear"]["points"]) == len(pair["bezier"]["points"]) == 3
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pair 0-1: CKA output" in result.output and "aligned    distance" in result.output


@pytest.mark.parametrize("arguments, message", [
    (["a.keras"], "two or more models"),
    (["a.keras", "wide.keras"], "differ in architecture"),
    (["a.keras", "a.keras", "--points", "2"], "--points"),
])
def test_cli_landscape_refuses_what_it_cannot_compare_in_one_line(digits_models, tmp_path, arguments, message):
    (model, *_), x, y = digits_models
    model.save(tmp_path / "a.keras")
    keras.Sequential([keras.Input((64,)), keras.layers.Dense(30, activation="relu"), keras.layers.Dense(10)]).save(
        tmp_path / "wide.keras")
    result = CliRunner().invoke(main, ["landscape", *(str(tmp_path / a) if a.endswith(".keras") else a for a in arguments),
                                       "--dataset", "digits", "--loss", LOSS, "--from-logits"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and message in result.output.strip().splitlines()[-1]


def test_experiment_taxonomy_writes_every_metric_per_cell(tmp_path):
    folder = tmp_path / "taxonomy"
    result = CliRunner().invoke(main, ["experiment", "taxonomy", "-o", str(folder), "--quick", "--widths", "4,8",
                                       "--batch-sizes", "128", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in folder.iterdir()) == ["cells.csv", "phases.png", "results.json", "summary.md"]
    cells = json.loads((folder / "results.json").read_text())["cells"]
    assert [(row["width"], row["batch_size"]) for row in cells] == [(4, 128), (8, 128)]
    for row in cells:
        assert 0 <= row["test_accuracy"] <= 1 and row["hessian_top"] > 0 and -1 <= row["cka"] <= 1
        assert -100 <= row["mc"] <= 100 and row["distance"] > 0
    assert "| 8 | 128 |" in (folder / "summary.md").read_text()


@pytest.mark.parametrize("option", ["--widths", "--batch-sizes"])
def test_experiment_taxonomy_refuses_a_bad_grid(tmp_path, option):
    result = CliRunner().invoke(main, ["experiment", "taxonomy", "-o", str(tmp_path / "t"), option, "4,x"])
    assert result.exit_code == 2 and "positive integers separated by commas" in result.output
    assert not (tmp_path / "t").exists()

"""Tests of `keras_embed.hessian`, the strict-saddle experiment and their commands.

The derivatives are checked against central finite differences of the gradient on tiny
float64 models; Lanczos and Hutchinson against the full spectrum; the experiment on the
width paper's claims (a split critical point stays critical, gains one zero eigenvalue per
split, never loses a negative one). The commands run through `CliRunner`: exit codes, the
JSON keys and values, and one-line errors for bad input.
"""

import functools
import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from builders import make_mlp
from keras_embed.errors import InputError
from keras_embed.experiments import strict_saddle as experiment
from keras_embed.hessian import (
    EmpiricalRisk, analyze_hessian, cast_model, check_targets, eigenvalue_counts, extreme_eigenvalues, get_loss,
    hutchinson_trace,
)
from keras_embed.tools.cli import main

rng = np.random.default_rng(0)
X = rng.standard_normal((40, 5))
CLASSES = rng.integers(0, 3, 40)
TARGETS = rng.standard_normal((40, 3))
JSON_KEYS = {"grad_norm", "eigenvalues", "negative", "zero", "positive", "trace"}


@pytest.fixture(scope="module")
def model():
    """A float32 5-4-3 tanh MLP (39 weights)."""
    return make_mlp([4, 3], activation="tanh", seed=3)


@pytest.fixture(scope="module")
def wide(model):
    return cast_model(model)


@pytest.fixture(scope="module", params=["mse", "sparse_categorical_crossentropy"])
def risk(request, wide):
    loss = get_loss(request.param, from_logits=request.param != "mse")
    return EmpiricalRisk(wide, X, TARGETS if request.param == "mse" else CLASSES, loss, batch_size=16)


def gradient_difference(risk, direction, step=1e-5):
    """Central difference of the gradient along `direction` (an approximation of H v)."""
    theta = risk.parameters()
    try:
        plus = risk.value_and_gradient(theta + step * direction)[1]
        minus = risk.value_and_gradient(theta - step * direction)[1]
    finally:
        risk.set_parameters(theta)
    return (plus - minus) / (2 * step)


# ---------------------------------------------------------------- derivatives


def test_cast_model_computes_the_same_in_float64_and_leaves_the_original(model, wide):
    assert keras.backend.standardize_dtype(wide.inputs[0].dtype) == "float64"
    assert {keras.backend.standardize_dtype(weight.dtype) for weight in wide.weights} == {"float64"}
    assert {keras.backend.standardize_dtype(weight.dtype) for weight in model.weights} == {"float32"}
    expected = keras.ops.convert_to_numpy(model(X.astype("float32")))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(wide(X)), expected, atol=1e-5)


def test_gradient_matches_finite_differences_of_the_loss(risk):
    theta = risk.parameters()
    gradient = risk.value_and_gradient(theta)[1]
    step, basis = 1e-6, np.eye(risk.size)
    differences = [(risk.value_and_gradient(theta + step * e)[0] - risk.value_and_gradient(theta - step * e)[0]) / (2 * step)
                   for e in basis[:8]]
    risk.set_parameters(theta)
    np.testing.assert_allclose(gradient[:8], differences, rtol=1e-6, atol=1e-9)


def test_hessian_vector_product_matches_finite_differences_of_the_gradient(risk):
    direction = np.random.default_rng(1).standard_normal(risk.size)
    product = risk.hvp(direction)
    np.testing.assert_allclose(product, gradient_difference(risk, direction), rtol=1e-6, atol=1e-8)
    assert np.linalg.norm(product) > 1e-3


def test_full_hessian_matches_finite_differences_and_the_products(risk):
    matrix = risk.hessian()
    columns = np.column_stack([gradient_difference(risk, e) for e in np.eye(risk.size)])
    np.testing.assert_allclose(matrix, columns, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(matrix, matrix.T)
    direction = np.random.default_rng(2).standard_normal(risk.size)
    np.testing.assert_allclose(risk.hvp(direction), matrix @ direction, rtol=1e-10, atol=1e-12)


def test_batches_sum_exactly(wide):
    whole = EmpiricalRisk(wide, X, TARGETS, "mse", batch_size=len(X))
    pieces = EmpiricalRisk(wide, X, TARGETS, "mse", batch_size=7)
    np.testing.assert_allclose(pieces.value_and_gradient()[1], whole.value_and_gradient()[1], rtol=1e-12)
    np.testing.assert_allclose(pieces.hessian(), whole.hessian(), rtol=1e-10, atol=1e-14)


def test_lanczos_extremes_agree_with_the_full_spectrum(risk):
    spectrum = np.linalg.eigvalsh(risk.hessian())
    largest, smallest = extreme_eigenvalues(risk, k=3)
    np.testing.assert_allclose(largest, spectrum[-3:], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(smallest, spectrum[:3], rtol=1e-7, atol=1e-9)


def test_hutchinson_trace_estimates_the_trace(wide):
    risk = EmpiricalRisk(wide, X, TARGETS, "mse")
    exact = np.trace(risk.hessian())
    estimate, error = hutchinson_trace(risk, samples=200, seed=4)
    assert 0 < error < abs(exact)
    assert abs(estimate - exact) < 4 * error


def test_analyze_hessian_reports_consistent_figures(risk):
    full = analyze_hessian(risk, full=True)
    assert JSON_KEYS <= set(full)
    assert full["negative"] + full["zero"] + full["positive"] == full["params"] == risk.size == len(full["eigenvalues"])
    assert full["counts_complete"] and full["trace_method"] == "exact"
    assert full["trace"] == pytest.approx(np.trace(risk.hessian()))
    lanczos = analyze_hessian(risk, top_k=2, trace_samples=20)
    assert not lanczos["counts_complete"] and len(lanczos["eigenvalues"]) == 4
    np.testing.assert_allclose(lanczos["eigenvalues"], np.array(full["eigenvalues"])[[0, 1, -2, -1]], rtol=1e-7)
    assert lanczos["grad_norm"] == pytest.approx(full["grad_norm"])


def test_eigenvalue_counts_use_a_threshold_relative_to_the_largest():
    counts = eigenvalue_counts([-3.0, -1e-12, 0.0, 2e-11, 4.0], rtol=1e-10)
    assert counts == {"negative": 1, "zero": 3, "positive": 1, "zero_threshold": 4e-10}
    assert eigenvalue_counts([-1e-9, 1.0], rtol=1e-10)["negative"] == 1


def test_loss_and_target_checks(wide):
    with pytest.raises(InputError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(InputError, match="no from_logits option"):
        get_loss("mse", from_logits=True)
    with pytest.raises(InputError, match="needs labels"):
        check_targets(None, X, wide, get_loss("mse"))
    with pytest.raises(InputError, match="sparse_categorical_crossentropy"):
        check_targets(CLASSES, X, wide, get_loss("mse"))
    with pytest.raises(InputError, match="integer class in 0..2"):
        check_targets(CLASSES + 1, X, wide, get_loss("sparse_categorical_crossentropy"))
    assert check_targets(TARGETS[:, :, None], X, wide, get_loss("mse")).shape == (40, 3)


def test_full_hessian_is_refused_above_the_limit():
    big = cast_model(make_mlp([80, 1], inputs=64))
    risk = EmpiricalRisk(big, np.zeros((2, 64)), np.zeros((2, 1)), "mse")
    with pytest.raises(InputError, match="above the 5000"):
        risk.hessian()


# ---------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def tanh_run():
    """The experiment on its tanh network only (a few seconds)."""
    return experiment.strict_saddle(setups=experiment.SETUPS[:1])


def test_split_critical_point_stays_critical_and_gains_one_zero_per_split(tanh_run):
    rows = tanh_run["rows"]
    assert [row["width"] for row in rows] == [2, 3, 4]
    assert all(row["grad_norm"] < 1e-8 for row in rows)
    assert max(row["loss"] for row in rows) - min(row["loss"] for row in rows) < 1e-12
    assert [row["zero"] for row in rows] == [rows[0]["zero"] + step for step in range(3)]
    negatives = [row["negative"] for row in rows]
    assert negatives == sorted(negatives)
    assert all(row["negative"] + row["zero"] + row["positive"] == row["params"] for row in rows)
    assert tanh_run["pattern_held"] and tanh_run["checks"]["tanh 1-D"]["zero_steps"] == [1, 1]


def test_local_minimum_becomes_a_strict_saddle(tanh_run):
    narrow, split = tanh_run["rows"][0], tanh_run["rows"][1]
    assert narrow["negative"] == 0 and narrow["zero"] == 0
    assert split["negative"] >= 1


def test_equal_split_keeps_the_outputs_and_shares_outgoing_weights_equally():
    setup = experiment.SETUPS[0]
    model = experiment.width_two_network(setup, 1, 1)
    split = experiment.split_equally(model, unit=1, copies=3)
    x = np.linspace(-1, 1, 9)[:, None]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(split(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-14)
    outgoing = split.get_layer("output").get_weights()[0][:, 0]
    np.testing.assert_allclose(outgoing[[1, 2, 3]], model.get_layer("output").get_weights()[0][1, 0] / 3, rtol=1e-14)


def test_pattern_flags_a_split_that_adds_two_zeros():
    rows = [{"network": "n", "grad_norm": 0.0, "zero": zero, "negative": negative}
            for zero, negative in [(0, 1), (2, 4), (4, 3)]]
    check = experiment.pattern(rows)["n"]
    assert check["zero_steps"] == [2, 2] and check["zero_grows_per_split"]
    assert not check["zero_plus_one_per_split"] and not check["negative_never_decreasing"]
    assert not check["expected_pattern"]


# ---------------------------------------------------------------- commands


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")


def assert_one_line_error(result, code, text):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    message = lines[-1]
    if lines[0].startswith("Usage:"):  # click's own usage error
        assert message.startswith("Error: ")
    else:
        assert len(lines) == 1 and message.startswith("keras-embed: error: ")
    assert text in message, message


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("hessian")
    model.save(folder / "model.keras")
    np.savez(folder / "regression.npz", x=X, y=TARGETS)
    np.savez(folder / "classes.npz", x=X, y=CLASSES)
    np.savez(folder / "unlabelled.npz", x=X)
    np.savez(folder / "short.npz", x=X, y=TARGETS[:-1])
    return folder


def test_hessian_command_full_spectrum_json(files, wide):
    output = files / "full.json"
    result = invoke("hessian", files / "model.keras", "--data", files / "regression.npz", "--loss", "mse", "--full",
                    "--json", output)
    assert result.exit_code == 0, result.output
    figures = json.loads(output.read_text())
    assert JSON_KEYS <= set(figures)
    expected = np.linalg.eigvalsh(EmpiricalRisk(wide, X, TARGETS, "mse").hessian())
    np.testing.assert_allclose(figures["eigenvalues"], expected, rtol=1e-9, atol=1e-12)
    assert figures["negative"] + figures["zero"] + figures["positive"] == 39
    assert f"{figures['negative']} negative, {figures['zero']} zero, {figures['positive']} positive" in result.stdout
    assert "gradient norm" in result.stdout and "(exact)" in result.stdout


def test_hessian_command_lanczos_json_on_stdout(files):
    result = invoke("hessian", files / "model.keras", "--data", files / "classes.npz", "--loss",
                    "sparse_categorical_crossentropy", "--from-logits", "--top-k", "2", "--trace-samples", "5",
                    "--json", "-")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["method"] == "lanczos" and len(figures["eigenvalues"]) == 4
    assert figures["trace_method"] == "hutchinson" and not figures["counts_complete"]
    assert "Lanczos, 4 of 39 computed" in result.stderr


def test_hessian_command_on_a_bundled_dataset(tmp_path):
    path = tmp_path / "iris.keras"
    make_mlp([3, 3], inputs=4, activation="sigmoid").save(path)
    result = invoke("hessian", path, "--dataset", "iris", "--loss", "sparse_categorical_crossentropy", "--from-logits",
                    "--full")
    assert result.exit_code == 0, result.output
    assert "27 weights, 150 samples" in result.stdout


@pytest.mark.parametrize("arguments, text", [
    (["--data", "regression.npz"], "Missing option '--loss'"),
    (["--data", "regression.npz", "--loss", "nope"], "unknown loss 'nope'"),
    (["--data", "short.npz", "--loss", "mse"], "40 inputs but 39 labels"),
    (["--data", "unlabelled.npz", "--loss", "mse"], "needs labels"),
    (["--data", "classes.npz", "--loss", "mse"], "for class labels use sparse_categorical_crossentropy"),
    (["--data", "regression.npz", "--loss", "sparse_categorical_crossentropy"], "one integer class"),
    (["--data", "regression.npz", "--loss", "mse", "--from-logits"], "no from_logits option"),
    (["--loss", "mse"], "give --data"),
    (["--data", "regression.npz", "--dataset", "iris", "--loss", "mse"], "not both"),
    (["--data", "regression.npz", "--loss", "mse", "--top-k", "0"], "--top-k"),
])
def test_hessian_command_bad_input_is_a_one_line_error(files, arguments, text):
    arguments = [files / argument if argument.endswith(".npz") else argument for argument in arguments]
    assert_one_line_error(invoke("hessian", files / "model.keras", *arguments), 2, text)


def test_hessian_command_missing_model_and_existing_json(files):
    assert_one_line_error(invoke("hessian", files / "absent.keras", "--data", files / "regression.npz", "--loss", "mse"),
                          2, "not found")
    existing = files / "existing.json"
    existing.write_text("{}")
    result = invoke("hessian", files / "model.keras", "--data", files / "regression.npz", "--loss", "mse",
                    "--json", existing)
    assert_one_line_error(result, 2, "already exists")
    assert existing.read_text() == "{}"


def test_strict_saddle_command_prints_and_writes_the_table(tmp_path, tanh_run, monkeypatch):
    monkeypatch.setattr(experiment, "strict_saddle", functools.partial(lambda result, **_: result, tanh_run))
    folder = tmp_path / "out"
    result = invoke("experiment", "strict-saddle", "-o", folder)
    assert result.exit_code == 0, result.output
    assert "expected pattern held" in result.stdout
    assert sorted(path.name for path in folder.iterdir()) == ["results.json", "spectra.png", "table.md"]
    assert json.loads((folder / "results.json").read_text())["rows"][1]["zero"] == tanh_run["rows"][1]["zero"]
    assert "| tanh 1-D | 3 | 10 |" in (folder / "table.md").read_text()
    assert (folder / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(invoke("experiment", "strict-saddle", "-o", folder), 2, "not empty")
    assert invoke("experiment", "strict-saddle", "-o", folder, "--overwrite").exit_code == 0

"""Accuracy budgets with a confidence level: bounds that cover the true drop, and a rule that
refuses what a point estimate on a few hundred rows lets through (issue 21)."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_embed import prune
from keras_embed.confidence import accuracy_drop_bound, output_error_bound, rows_to_certify
from keras_embed.errors import InputError
from keras_embed.files.data import bundled_dataset
from keras_embed.stopping import StoppingRule, measure
from keras_embed.tools.cli import main


def test_a_model_that_agrees_on_every_row_is_bounded_by_the_exact_binomial_bound():
    assert accuracy_drop_bound(0, 0, 297, 0.95) == pytest.approx(100 * (1 - 0.025 ** (1 / 297)))  # 1.23 pp
    assert accuracy_drop_bound(0, 0, 297, 0.99) > accuracy_drop_bound(0, 0, 297, 0.95)
    assert accuracy_drop_bound(3, 3, 10_000, 0.95) < accuracy_drop_bound(3, 3, 1_000, 0.95)


@pytest.mark.parametrize("lose, gain, rows", [(0.01, 0.0, 300), (0.03, 0.02, 500), (0.002, 0.001, 2_000)])
def test_the_bound_covers_the_true_drop_at_least_as_often_as_its_confidence(lose, gain, rows):
    """Paired rows drawn as losses, gains and ties (a multinomial, the way two models disagree):
    over 2,000 draws the 95% bound lies below the true drop in at most 5% of them."""
    draws = np.random.default_rng(0).multinomial(rows, [lose, gain, 1 - lose - gain], size=2_000)
    true_drop = 100 * (lose - gain)
    missed = np.mean([accuracy_drop_bound(losses, gains, rows, 0.95) < true_drop for losses, gains, _ in draws])
    assert missed <= 0.05


def test_rows_to_certify_is_the_fewest_rows_whose_bound_meets_the_budget():
    needed = rows_to_certify(losses=2, gains=1, rows=1_000, budget=0.3, confidence=0.95)
    assert accuracy_drop_bound(2 * needed / 1_000, needed / 1_000, needed, 0.95) <= 0.3
    fewer = int(needed * 0.98)  # rows_to_certify stops within 1%
    assert accuracy_drop_bound(2 * fewer / 1_000, fewer / 1_000, fewer, 0.95) > 0.3
    assert rows_to_certify(losses=5, gains=0, rows=1_000, budget=0.5, confidence=0.95) is None  # 0.5 pp measured


def test_the_output_error_bound_is_above_the_measured_error_and_tightens_with_rows():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((4_000, 10))
    outputs = reference + 0.05 * rng.standard_normal((4_000, 10))
    few, many = measure(reference[:100], outputs[:100], confidence=0.95), measure(reference, outputs, confidence=0.95)
    assert few["output_error"] < few["output_error_bound"]
    assert many["output_error"] < many["output_error_bound"] < few["output_error_bound"]
    assert output_error_bound(np.ones(1), 1.0, 0.95) == np.inf  # one row says nothing about the spread


@pytest.fixture(scope="module")
def digits_split():
    """A 64-256-10 relu MLP trained on 800 shuffled digits; 200 validation rows, 797 test rows."""
    x, y = bundled_dataset("digits")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:800], y[:800], epochs=30, verbose=0)
    return model, (x[:800], y[:800]), (x[800:1000], y[800:1000]), (x[1000:], y[1000:])


def test_the_confidence_rule_refuses_what_the_point_estimate_lets_through_and_keeps_a_larger_model(digits_split):
    """A budget of 1.9 points on 200 validation rows: the point estimate accepts a model that
    drops more than 1.9 points on the 797 test rows; the 95% bound refuses it and keeps a larger
    model that holds there."""
    model, (x, y), (x_val, y_val), (x_test, y_test) = digits_split
    reference = model.predict(x_test, verbose=0)
    results = {}
    for confidence in (None, 0.95):
        pruned, report = prune(model, data=x, labels=y, validation=x_val, validation_labels=y_val, mode="data",
                               rule=StoppingRule("max_accuracy_drop", 1.9, confidence))
        test = measure(reference, pruned.predict(x_test, verbose=0), y_test)
        results[confidence] = report.to_dict()["params_after"], report.checks, test["accuracy_drop"]
    point_params, point_checks, point_test = results[None]
    bound_params, bound_checks, bound_test = results[0.95]
    assert point_checks["accuracy_drop"] <= 1.9 < point_test  # passes on validation, fails on unseen rows
    assert "accuracy_drop_bound" not in point_checks
    assert bound_checks["accuracy_drop"] <= bound_checks["accuracy_drop_bound"] <= 1.9
    assert bound_params > point_params and bound_test <= 1.9


def test_the_cli_reports_the_bound_and_says_how_many_rows_would_certify_a_budget(digits_split, tmp_path):
    model, (x, y), (x_val, y_val), _ = digits_split
    model.save(tmp_path / "mlp.keras")
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "val.npz", x=x_val, y=y_val)
    base = ["prune", str(tmp_path / "mlp.keras"), "--mode", "data", "--data", str(tmp_path / "train.npz"),
            "--validation", str(tmp_path / "val.npz")]
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "ok.keras"), "--max-accuracy-drop", "1.9",
                                       "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rule"] == {"kind": "max_accuracy_drop", "value": 1.9, "confidence": 0.95}
    assert report["rows"] == 200 and report["accuracy_drop_bound"] <= 1.9
    assert report["accuracy_drop"] == pytest.approx(100 * (report["losses"] - report["gains"]) / 200)
    assert "upper 95% confidence bounds on 200 rows" in result.output
    refused = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "no.keras"), "--max-accuracy-drop", "0.5"])
    assert refused.exit_code == 3, refused.output
    assert "confidence bound 1.83 pp on 200 rows" in refused.output and "validation rows would certify" in refused.output
    assert not (tmp_path / "no.keras").exists()


@pytest.mark.parametrize("confidence", ["0", "1", "1.5", "nan"])
def test_a_confidence_outside_zero_one_is_refused(tmp_path, confidence):
    result = CliRunner().invoke(main, ["prune", "m.keras", "-o", str(tmp_path / "o.keras"), "--mode", "data",
                                       "--keep-ratio", "0.5", "--confidence", confidence])
    assert result.exit_code == 2 and "--confidence" in result.output


def test_the_library_refuses_a_confidence_outside_zero_one():
    with pytest.raises(InputError, match="--confidence must be strictly between 0 and 1"):
        StoppingRule("max_accuracy_drop", 1.0, confidence=1.0)

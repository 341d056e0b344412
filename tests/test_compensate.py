"""Approximate compression: greedy selection and refit (data mode), condense, stopping rules."""

import json
import math
import re

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from builders import make_mlp
from keras_embed import build_model, read_model
from keras_embed.edit.plan import GroupEdit, Merge, Plan
from keras_embed.edit.surgery import apply_plan
from keras_embed.errors import InputError, RuleError
from keras_embed.find.condense import plan_condense
from keras_embed.find.grouping import cosine_groups
from keras_embed.find.refit import compress_groups, greedy_selection, refit
from keras_embed.pipeline import prune
from keras_embed.stopping import StoppingRule, stopping_rule_from_options
from keras_embed.tools.cli import main


def _regression(samples=300, features=6, targets=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((samples, features))
    z = a[:, [1, 4]] @ rng.standard_normal((2, targets)) + 0.3 + 0.01 * rng.standard_normal((samples, targets))
    augmented = np.column_stack([a, np.ones(samples)])
    return a, z, augmented.T @ augmented, augmented.T @ z, float((z**2).sum())


def _lstsq_residual(a, z, units):
    design = np.column_stack([a[:, list(units)], np.ones(len(a))])
    solution = np.linalg.lstsq(design, z, rcond=None)[0]
    return float(((design @ solution - z) ** 2).sum()), solution


def test_greedy_residuals_equal_direct_least_squares_of_the_chosen_units():
    a, z, gram, cross, energy = _regression()
    order, energies = greedy_selection(gram, cross, energy)
    assert sorted(order[:2]) == [1, 4]  # the two units z depends on come first
    for count in range(len(order) + 1):
        assert energies[count] == pytest.approx(_lstsq_residual(a, z, order[:count])[0], rel=1e-6, abs=1e-9)


def test_each_greedy_step_takes_the_best_single_addition():
    a, z, gram, cross, energy = _regression(seed=3)
    order, _ = greedy_selection(gram, cross, energy)
    for step in range(3):
        best = min((unit for unit in range(a.shape[1]) if unit not in order[:step]),
                   key=lambda unit: _lstsq_residual(a, z, order[:step] + [unit])[0])
        assert order[step] == best


def test_refit_equals_numpy_least_squares():
    a, z, gram, cross, _ = _regression(seed=1)
    kernel, bias = refit(gram, cross, [1, 4, 5])
    expected = _lstsq_residual(a, z, [1, 4, 5])[1]
    np.testing.assert_allclose(np.vstack([kernel, bias]), expected, rtol=1e-5, atol=1e-7)


def test_without_intercept_greedy_and_refit_fit_through_the_origin():
    a, z, gram, cross, energy = _regression(seed=2)
    order, energies = greedy_selection(gram[:-1, :-1], cross[:-1], energy, intercept=False)
    assert energies[0] == pytest.approx(energy) and len(energies) == len(order) + 1
    for count in (1, 3):
        residual = np.linalg.lstsq(a[:, order[:count]], z, rcond=None)[1]
        assert energies[count] == pytest.approx(float(residual.sum()), rel=1e-6)
    kernel, bias = refit(gram, cross, order[:3], intercept=False)
    np.testing.assert_allclose(kernel, np.linalg.lstsq(a[:, order[:3]], z, rcond=None)[0], rtol=1e-5, atol=1e-7)
    assert not bias.any()


def _combination_model(k=3, extra=9, seed=0):
    """Hidden layer of k + extra linear units whose last `extra` are combinations of the first k."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((5, k))
    mixing = rng.standard_normal((k, extra))
    kernel = np.column_stack([base, base @ mixing])
    bias = np.concatenate([b := rng.standard_normal(k), b @ mixing])
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(k + extra, activation="linear", name="mixed"),
                              keras.layers.Dense(4, activation="tanh", name="next"), keras.layers.Dense(2, name="out")])
    model.set_weights([kernel, bias, rng.standard_normal((k + extra, 4)), rng.standard_normal(4),
                       rng.standard_normal((4, 2)), rng.standard_normal(2)])
    return model


def test_units_that_are_combinations_of_k_others_reduce_to_k_with_equal_outputs():
    model = _combination_model(k=3)
    x = np.random.default_rng(1).standard_normal((400, 5)).astype("float32")
    compressed, _ = compress_groups(read_model(model), x, tolerance=1e-9)
    assert compressed.widths[0] == 3
    outputs, expected = np.asarray(build_model(compressed)(x)), np.asarray(model(x))
    assert np.abs(outputs - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_a_shared_cache_gives_the_same_result_and_is_reused():
    graph = read_model(_combination_model(k=3))
    x = np.random.default_rng(1).standard_normal((400, 5)).astype("float32")
    cache = {}
    fresh, fresh_edits = compress_groups(graph, x, tolerance=1e-9)
    cached, cached_edits = compress_groups(graph, x, tolerance=1e-9, cache=cache)
    passes = len(cache)
    again, _ = compress_groups(graph, x, tolerance=1e-10, cache=cache)  # the same units: no new pass
    # one statistics pass per hidden layer, beside the reference network's probe
    assert "reference" in cache and len(cache) == passes == 1 + len(graph.editable_groups()) == 3
    assert fresh_edits == cached_edits
    for edit, cached_edit in zip(fresh_edits, cached_edits):  # the fitted weights too
        np.testing.assert_array_equal(edit.mix, cached_edit.mix)
        np.testing.assert_array_equal(edit.shift, cached_edit.shift)
    for layer, cached_layer, again_layer in zip(fresh.producers, cached.producers, again.producers):
        np.testing.assert_array_equal(layer.entry.kernel(layer), cached_layer.entry.kernel(cached_layer))
        np.testing.assert_array_equal(layer.entry.kernel(layer), again_layer.entry.kernel(again_layer))


@pytest.fixture(scope="module")
def digits_split():
    from keras_embed.files.data import bundled_dataset

    x, y = bundled_dataset("digits")
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:1200]], y[order[:1200]], x[order[1200:]], y[order[1200:]]


@pytest.fixture(scope="module")
def wide_digits_model(digits_split):
    x, y, _, _ = digits_split
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(96, activation="relu", name="hidden"),
                              keras.layers.Dense(10, name="logits")])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    return model


def dead_units(model, x):
    """Hidden relu units never positive on `x` (float64 numpy from the model's weights)."""
    kernel, bias = model.get_layer("hidden").get_weights()
    return int((np.asarray(x, dtype=np.float64) @ kernel + bias <= 0).all(axis=0).sum())


def quarter_of_the_units(model, x):
    """What keep_ratio 0.25 keeps of the hidden layer: the exact data rules go first and
    remove the units dead on the calibration data, the refit keeps a quarter of the
    original 96 (at most all the live ones)."""
    return min(96 - dead_units(model, x), math.ceil(0.25 * 96))


@pytest.mark.parametrize("kind, value", [("keep_ratio", 0.25), ("target_params", 2000),
                                         ("max_output_error", 0.1), ("max_accuracy_drop", 2.0)])
def test_data_mode_meets_its_stopping_rule_on_held_out_data(wide_digits_model, digits_split, kind, value):
    x, y, x_val, y_val = digits_split
    pruned, report = prune(wide_digits_model, data=x, mode="data", rule=StoppingRule(kind, value), labels=y,
                           validation=x_val, validation_labels=y_val)
    figures = report.to_dict()
    assert figures["checked_on"] == "validation data"
    assert figures["layers"][0]["width_after"] < 96
    assert StoppingRule(kind, value).holds(figures, pruned.count_params())
    if kind == "keep_ratio":
        assert figures["layers"][0]["dead"] == dead_units(wide_digits_model, x)
        assert figures["layers"][0]["width_after"] == quarter_of_the_units(wide_digits_model, x)


def test_validation_that_breaks_the_rule_raises_and_force_overrides(wide_digits_model, digits_split):
    x, y, x_val, y_val = digits_split
    shifted = (x_val + 0.5).astype("float32")  # off the calibration distribution
    rule = StoppingRule("max_output_error", 1e-9)  # below float32 rounding: no compression can meet it
    with pytest.raises(RuleError, match="relative output error .* nothing was written"):
        prune(wide_digits_model, data=x, mode="data", rule=rule, validation=shifted)
    _, report = prune(wide_digits_model, data=x, mode="data", rule=rule, validation=shifted, force=True)
    figures = report.to_dict()
    assert figures["output_error"] > 1e-9 and figures["checked_on"] == "validation data"


def test_data_mode_search_measures_its_rule_on_the_validation_data(wide_digits_model, digits_split):
    x, y, x_val, y_val = digits_split
    shifted = (x_val + 0.5).astype("float32")
    rule = StoppingRule("max_output_error", 0.05)
    pruned, report = prune(wide_digits_model, data=x, mode="data", rule=rule, validation=shifted)
    assert report.to_dict()["output_error"] <= 0.05  # met where it is judged, though calibrated elsewhere


def test_data_mode_needs_data_a_rule_and_labels_for_accuracy(wide_digits_model, digits_split):
    x, _, _, _ = digits_split
    with pytest.raises(InputError):
        prune(wide_digits_model, mode="data", rule=StoppingRule("keep_ratio", 0.5))
    with pytest.raises(InputError):
        prune(wide_digits_model, data=x, mode="data")
    with pytest.raises(InputError, match="needs class labels"):
        prune(wide_digits_model, data=x, mode="data", rule=StoppingRule("max_accuracy_drop", 1.0))


@pytest.mark.parametrize("options, problem", [
    ({}, "exactly one"), ({"keep_ratio": 0.5, "target_params": 10}, "exactly one"),
    ({"keep_ratio": 0.0}, "(0, 1]"), ({"keep_ratio": 1.5}, "(0, 1]"), ({"max_output_error": -1.0}, "positive"),
])
def test_rule_options_are_validated(options, problem):
    with pytest.raises(InputError, match=re.escape(problem)):
        stopping_rule_from_options(**{"max_accuracy_drop": None, **options})


def test_cosine_groups_merge_only_similar_directions():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 8))
    vectors = np.vstack([base, 2.0 * base[0] + 1e-4 * rng.standard_normal(8), -base[1]])
    groups = cosine_groups(vectors, 0.999)
    assert groups == [[0, 3]]  # the opposite vector stays alone


@pytest.mark.parametrize("activation, merged", [("relu", True), ("tanh", False)])
def test_condense_merges_near_parallel_units_of_homogeneous_layers_only(activation, merged):
    model = make_mlp([6, 3], activation, inputs=4, seed=2)
    graph = read_model(model)
    layer, next_layer = graph.producers
    layer_kernel, layer_bias = layer.entry.kernel(layer), layer.entry.bias(layer)
    next_kernel, next_bias = next_layer.entry.kernel(next_layer), next_layer.entry.bias(next_layer)
    kernel = np.column_stack([layer_kernel, 1.5 * layer_kernel[:, 0] * (1 + 1e-5)])
    bias = np.append(layer_bias, 1.5 * layer_bias[0] * (1 + 1e-5))
    next_grown = np.vstack([next_kernel, next_kernel[0]])
    replaced = {layer.name: layer.entry.with_weights(layer, kernel, bias),
                next_layer.name: next_layer.entry.with_weights(next_layer, next_grown, next_bias)}
    grown = graph.with_nodes(replaced.get(node.name, node) for node in graph.nodes)
    edits = plan_condense(grown, 0.9999)
    condensed = apply_plan(grown, Plan((edits,)))
    assert condensed.widths[0] == (6 if merged else 7)
    if merged:  # the larger copy (unit 6) represents its group, the smaller one goes into it
        [edit] = edits
        assert isinstance(edit, GroupEdit) and edit.group == "hidden_0"
        assert edit.merges == (Merge(6, (0,), (pytest.approx(1 / (1.5 * (1 + 1e-5)), rel=1e-9),)),)
    else:
        assert edits == ()
    if merged:
        x = np.random.default_rng(3).standard_normal((200, 4)).astype("float32")
        expected, actual = np.asarray(build_model(grown)(x)), np.asarray(build_model(condensed)(x))
        assert np.abs(expected - actual).max() <= 1e-3 * np.abs(expected).max()


def test_cli_data_mode_writes_nothing_when_validation_breaks_the_rule(tmp_path, wide_digits_model, digits_split):
    x, y, x_val, _ = digits_split
    model_path, output = tmp_path / "model.keras", tmp_path / "out.keras"
    wide_digits_model.save(model_path)
    np.savez(tmp_path / "calib.npz", x=x, y=y)
    np.savez(tmp_path / "shifted.npz", x=(x_val + 0.5).astype("float32"))
    args = ["prune", str(model_path), "-o", str(output), "--mode", "data", "--data", str(tmp_path / "calib.npz"),
            "--validation", str(tmp_path / "shifted.npz"), "--max-output-error", "1e-9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert "nothing was written" in result.stderr and "Traceback" not in result.output
    assert not output.exists()
    ok = CliRunner().invoke(main, args[:-4] + ["--validation", str(tmp_path / "calib.npz"), "--keep-ratio", "0.25", "--json"])
    assert ok.exit_code == 0, ok.output
    row = json.loads(ok.stdout)["layers"][0]
    assert row["width_after"] == quarter_of_the_units(wide_digits_model, x) and output.exists()


def test_cli_refuses_rules_outside_data_mode(tmp_path, wide_digits_model):
    model_path = tmp_path / "model.keras"
    wide_digits_model.save(model_path)
    result = CliRunner().invoke(main, ["prune", str(model_path), "-o", str(tmp_path / "o.keras"), "--keep-ratio", "0.5"])
    assert result.exit_code == 2 and "--mode data only" in result.stderr

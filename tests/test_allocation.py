"""Widths chosen across layers, FLOPs and latency targets, and the calibration rows held out
to judge on (issue 21)."""

import dataclasses
import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_embed import prune, read_model
from keras_embed.edit.operators import widen
from keras_embed.edit.plan import GroupEdit
from keras_embed.edit.surgery import apply_round
from keras_embed.files.data import split_calibration
from keras_embed.find.allocation import channel_cost, count_at_price
from keras_embed.measure.latency import Latency
from keras_embed.model.build import build_model
from keras_embed.pipeline import hold_out
from keras_embed.stopping import StoppingRule, measure
from keras_embed.tools.cli import main
from keras_embed.verify import predict

L = keras.layers


def test_the_count_at_a_price_trades_the_share_left_unexplained_against_the_cost_kept():
    energies = [1.0, 0.2, 0.05, 0.04]
    assert count_at_price(energies, price=10.0, share=0.01) == 2  # 0.2+0.1, 0.05+0.2, 0.04+0.3
    assert count_at_price(energies, price=0.0, share=0.01) == 3
    assert count_at_price(energies, price=1e6, share=0.01) == 1
    assert count_at_price([0.0, 0.0, 0.0], price=0.0, share=0.5) == 1  # nothing to explain: one channel stays


def _saved_by_removing_one(graph, group, measure):
    after = apply_round(graph, (GroupEdit(group, graph.group_width(group), dead=(0,)),))
    return (graph.params - after.params) if measure == "params" else (graph.flops - after.flops)


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(2, 9), min_size=1, max_size=3), features=st.integers(1, 6),
       measure=st.sampled_from(["params", "flops"]))
def test_a_dense_channel_costs_what_removing_it_saves(widths, features, measure):
    layers = [keras.Input((features,))] + [L.Dense(width, activation="relu") for width in widths] + [L.Dense(2)]
    graph = read_model(keras.Sequential(layers))
    for group in graph.editable_groups():
        assert channel_cost(graph, group, measure) == _saved_by_removing_one(graph, group, measure)


@pytest.mark.parametrize("measure", ["params", "flops"])
def test_a_convolutional_channel_costs_what_removing_it_saves_through_depthwise_concatenate_and_flatten(measure):
    """Channels of a conv (BatchNormalization folded into it), read by a depthwise conv, by
    1x1 convs whose outputs are concatenated, flattened into a Dense layer: per-channel
    layers, readers and every flattened position count."""
    inputs = keras.Input((8, 8, 3))
    stem = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same")(inputs)))
    spread = L.DepthwiseConv2D(3)(stem)
    joined = L.Concatenate()([L.Conv2D(4, 1)(spread), L.Conv2D(5, 1, activation="relu")(spread)])
    outputs = L.Dense(3)(L.Dense(7, activation="relu")(L.Flatten()(joined)))
    graph = read_model(keras.Model(inputs, outputs))
    assert len(graph.editable_groups()) == 4
    for group in graph.editable_groups():
        assert channel_cost(graph, group, measure) == _saved_by_removing_one(graph, group, measure)


def _noisy(model, scale, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        layer.set_weights([weight + scale * rng.standard_normal(weight.shape) for weight in layer.get_weights()])
    return model


@pytest.fixture(scope="module")
def near_copies():
    """A 10-16-24-3 tanh MLP whose first hidden layer is widened to 64 by splits and then moved
    by 1e-4 noise: 48 near copies there, none in the second layer; and its calibration rows."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), L.Dense(16, activation="tanh", name="first"),
                              L.Dense(24, activation="tanh", name="second"), L.Dense(3, name="out")])
    graph, rng = read_model(model), np.random.default_rng(1)
    for _ in range(48):
        graph = widen(graph, "first", int(rng.integers(16)), float(rng.uniform(0.2, 0.8)))
    x = np.random.default_rng(2).standard_normal((2_000, 10)).astype("float32")
    return _noisy(build_model(graph), 1e-4), x, model.count_params()


def test_global_allocation_takes_the_near_copies_where_one_keep_ratio_cuts_both_layers(near_copies):
    """At the narrow network's parameter count, global allocation removes the 48 near copies
    and keeps the second layer whole (output error near the noise's); a uniform keep ratio
    has to cut the second layer as much as the first, and loses far more."""
    model, x, narrow_params = near_copies
    rule = StoppingRule("target_params", narrow_params)
    results = {allocation: prune(model, data=x, mode="data", rule=rule, allocation=allocation)[1].to_dict()
               for allocation in ("global", "uniform")}
    widths = {allocation: {row["name"]: row["width_after"] for row in figures["layers"]}
              for allocation, figures in results.items()}
    assert widths["global"]["second"] == 24 and widths["global"]["first"] <= 16
    assert widths["uniform"]["second"] < 24
    assert all(figures["params_after"] <= narrow_params for figures in results.values())
    assert results["global"]["output_error"] < 1e-2 < results["uniform"]["output_error"]


def test_a_flops_target_as_a_share_is_met_and_reported_next_to_its_value(near_copies, tmp_path):
    model, x, _ = near_copies
    model_path, data = tmp_path / "model.keras", tmp_path / "x.npy"
    model.save(model_path)
    np.save(data, x)
    result = CliRunner().invoke(main, ["prune", str(model_path), "-o", str(tmp_path / "small.keras"), "--data", str(data),
                                       "--mode", "data", "--target-flops", "0.25", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rule"] == {"kind": "target_flops", "value": 0.25 * report["flops_before"]}
    assert report["flops_after"] == report["flops"] <= 0.25 * report["flops_before"]
    assert report["flops_after"] == read_model(keras.saving.load_model(tmp_path / "small.keras")).flops
    assert f"flops: {report['flops_after']:,} per sample (target {int(0.25 * report['flops_before']):,})" in result.output


@dataclasses.dataclass(frozen=True)
class FlopsClock(Latency):
    """A runtime whose milliseconds are the model's FLOPs / 1e4: the search, not the clock, under test."""

    def milliseconds(self, model):
        return read_model(model).flops / 1e4


def test_a_latency_target_is_met_on_the_runtime_measured_with_the_smallest_compression_that_meets_it(near_copies):
    model, x, _ = near_copies
    before = FlopsClock().milliseconds(model)
    pruned, report = prune(model, data=x, mode="data", rule=StoppingRule("target_latency", before / 3),
                           latency=FlopsClock())
    figures = report.to_dict()
    assert figures["latency_ms_before"] == before and figures["latency_ms"] == FlopsClock().milliseconds(pruned)
    assert before / 4 < figures["latency_ms"] <= before / 3  # not much smaller than it needs to be
    assert figures["latency_on"] == {"runtime": "tflite", "batch_size": 1, "threads": 1}


@dataclasses.dataclass(frozen=True)
class FloorClock(Latency):
    """A runtime slowest at both ends: FLOPs / 1e4 plus a fixed cost that grows as the model
    narrows (fastest at `fastest` FLOPs), each call recorded as (FLOPs, milliseconds) in `calls`."""

    fastest: float = 1.0
    calls: list = dataclasses.field(default_factory=list, compare=False)

    def milliseconds(self, model):
        flops = read_model(model).flops
        self.calls.append((flops, flops / 1e4 + self.fastest**2 / 1e4 / flops))
        return self.calls[-1][1]


def test_an_unreachable_latency_target_under_force_returns_the_fastest_candidate_not_the_narrowest(near_copies):
    model, x, _ = near_copies
    flops = read_model(model).flops
    clock = FloorClock(fastest=flops / 3)
    best_possible = 2 * clock.fastest / 1e4
    pruned, report = prune(model, data=x, mode="data", rule=StoppingRule("target_latency", best_possible / 2),
                           latency=clock, force=True)
    candidates = clock.calls[:-2]  # then the written model and the original are measured
    narrowest = min(candidates)
    assert report.to_dict()["latency_ms"] == min(ms for _, ms in candidates) < narrowest[1]
    assert read_model(pruned).flops > narrowest[0]


def test_cli_latency_target_reports_the_measured_latency_on_tflite(near_copies, tmp_path):
    """The real clock: a target far above what the model takes holds, and the report and
    summary give both latencies and the runtime they were measured on."""
    model, x, _ = near_copies
    model_path, data = tmp_path / "model.keras", tmp_path / "x.npy"
    model.save(model_path)
    np.save(data, x[:400])
    result = CliRunner().invoke(main, ["prune", str(model_path), "-o", str(tmp_path / "small.keras"), "--data", str(data),
                                       "--mode", "data", "--target-latency", "1000", "--latency-batch", "4",
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 < report["latency_ms"] <= 1000 and report["latency_ms_before"] > 0
    assert report["latency_on"] == {"runtime": "tflite", "batch_size": 4, "threads": 1}
    assert "latency on tflite (batch 4, 1 thread): " in result.output and "(target 1000 ms)" in result.output


def test_without_validation_a_seeded_share_of_the_rows_judges_and_the_rest_calibrates(near_copies):
    """The same model and figures as calibrating on the other rows with the held-out ones as
    validation data; the report says which rows."""
    model, x, _ = near_copies
    y = np.argmax(predict(model, x), axis=1)
    rule = StoppingRule("keep_ratio", 0.3)
    pruned, report = prune(model, data=x, labels=y, mode="data", rule=rule)
    (fit_x, fit_y), (held_x, held_y) = split_calibration(x, y, 0.2, seed=0)
    explicit, by_hand = prune(model, data=fit_x, labels=fit_y, validation=held_x, validation_labels=held_y,
                              mode="data", rule=rule)
    figures = report.to_dict()
    assert figures["checked_on"] == "held-out calibration rows"
    assert figures["held_out"] == {"share": 0.2, "seed": 0, "rows": 400, "calibration_rows": 1600}
    assert figures["accuracy_drop"] == by_hand.checks["accuracy_drop"]
    np.testing.assert_array_equal(predict(pruned, held_x), predict(explicit, held_x))
    assert figures == {**figures, **measure(predict(model, held_x), predict(pruned, held_x), held_y)}


def test_figures_on_the_calibration_rows_or_on_fewer_rows_than_kept_channels_come_with_warnings(near_copies, tmp_path):
    model, x, _ = near_copies
    _, report = prune(model, data=x[:50], mode="data", rule=StoppingRule("keep_ratio", 1.0), hold_out_share=0)
    notes = report.checks["warnings"]
    assert report.checks["checked_on"] == "calibration data" and "held_out" not in report.checks
    assert any("fitted to and say little about other inputs" in note for note in notes)
    assert any("50 calibration rows but group 'first' keeps" in note for note in notes)
    model_path, data = tmp_path / "model.keras", tmp_path / "x.npy"
    model.save(model_path)
    np.save(data, x[:50])
    result = CliRunner().invoke(main, ["prune", str(model_path), "-o", str(tmp_path / "s.keras"), "--data", str(data),
                                       "--mode", "data", "--keep-ratio", "1"])
    assert result.exit_code == 0, result.output
    assert "warning: 40 calibration rows but group 'first' keeps" in result.stderr
    assert "on held-out calibration rows (10 of 50, seed 0)" in result.stdout


@pytest.mark.parametrize("options, message", [
    (["--target-flops", "0"], "--target-flops must be positive"),
    (["--target-latency", "-1"], "--target-latency must be positive"),
    (["--target-latency", "1", "--latency-batch", "0"], "--latency-batch"),
    (["--keep-ratio", "0.5", "--hold-out", "0.95"], "--hold-out"),
])
def test_bad_targets_are_refused_in_one_line_before_any_work(near_copies, tmp_path, options, message):
    model, x, _ = near_copies
    model_path, data = tmp_path / "model.keras", tmp_path / "x.npy"
    model.save(model_path)
    np.save(data, x[:50])
    result = CliRunner().invoke(main, ["prune", str(model_path), "-o", str(tmp_path / "s.keras"), "--data", str(data),
                                       "--mode", "data", *options])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s.keras").exists()

"""Folders written by tf.data.Dataset.save as --data and --validation, and generator
functions in the library: the same pruned model as the same rows given as an .npz."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_embed import prune
from keras_embed.errors import InputError
from keras_embed.files.data import batches, load_checked, spread_rows
from keras_embed.stopping import StoppingRule
from keras_embed.tools.cli import main

ROWS = 600


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 8-48-3 softmax MLP fitted briefly to a 3-class task; its rows as an .npz and as saved datasets."""
    root = tmp_path_factory.mktemp("saved_datasets")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, 8)).astype("float32")
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(48, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    model.save(root / "model.keras")
    np.savez(root / "rows.npz", x=x, y=y)
    tf.data.Dataset.from_tensor_slices((x, y)).batch(64).save(str(root / "batched"))
    tf.data.Dataset.from_tensor_slices({"x": x.astype("float64"), "y": y}).save(str(root / "rows_dict"))
    tf.data.Dataset.from_tensor_slices(x).save(str(root / "inputs_only"))
    return root, model, x, y


def _prune(root, data, output, *extra):
    result = CliRunner().invoke(main, ["prune", str(root / "model.keras"), "-o", str(root / output), "--mode", "data",
                                       "--max-accuracy-drop", "5", "--data", str(root / data), "--validation",
                                       str(root / data), "--max-samples", "300", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):]), keras.saving.load_model(root / output)


@pytest.mark.parametrize("saved", ["batched", "rows_dict"])
def test_a_saved_dataset_prunes_like_the_same_rows_in_an_npz(task, saved):
    root, _, x, _ = task
    from_npz, npz_model = _prune(root, "rows.npz", f"npz_{saved}.keras")
    from_saved, saved_model = _prune(root, saved, f"{saved}.keras")
    assert from_saved["params_after"] == from_npz["params_after"] < from_npz["params_before"]
    assert from_saved["accuracy_drop"] == from_npz["accuracy_drop"]
    np.testing.assert_allclose(saved_model.predict(x, verbose=0), npz_model.predict(x, verbose=0), atol=1e-6)


def test_labels_rows_and_spread_rows_come_from_the_saved_elements(task):
    root, model, x, y = task
    rows, labels = load_checked(root / "batched", model)
    assert len(rows) == ROWS and np.array_equal(labels, y)
    np.testing.assert_array_equal(np.concatenate(list(batches(rows, 100))), x)
    spread = spread_rows(rows, 250)  # every 3rd row, read again from disk
    assert len(spread) == 200 and np.array_equal(spread.labels, y[::3])
    np.testing.assert_array_equal(np.concatenate(list(batches(spread))), x[::3])
    np.testing.assert_array_equal(rows[:5], x[:5])
    assert load_checked(root / "inputs_only", model)[1] is None


def test_an_accuracy_budget_on_a_saved_dataset_without_labels_is_refused(task):
    root, *_ = task
    result = CliRunner().invoke(main, ["prune", str(root / "model.keras"), "-o", str(root / "no_labels.keras"),
                                       "--mode", "data", "--max-accuracy-drop", "1", "--data", str(root / "inputs_only")])
    assert result.exit_code == 2 and "needs class labels" in result.output
    assert not (root / "no_labels.keras").exists()


def test_a_model_of_two_inputs_reads_a_saved_dataset_keyed_by_input_name(tmp_path):
    image, features = keras.Input((4, 4, 1), name="image"), keras.Input((3,), name="features")
    joined = keras.layers.Concatenate()([keras.layers.Flatten()(image), features])
    model = keras.Model([image, features], keras.layers.Dense(2)(keras.layers.Dense(6, activation="relu")(joined)))
    rng = np.random.default_rng(1)
    inputs = {"image": rng.random((40, 4, 4, 1), "float32"), "features": rng.random((40, 3), "float32")}
    tf.data.Dataset.from_tensor_slices((inputs, np.zeros(40))).batch(16).save(str(tmp_path / "pairs"))
    rows, labels = load_checked(tmp_path / "pairs", model)
    assert len(rows) == 40 and len(labels) == 40
    first = next(batches(rows, 40))
    np.testing.assert_array_equal(first["features"], inputs["features"])


@pytest.mark.parametrize("saved, message", [
    (lambda: tf.data.Dataset.from_tensor_slices(np.zeros((10, 5), "float32")), "shape (5,) but the model takes (n, 8)"),
    (lambda: tf.data.Dataset.from_tensor_slices(np.full((10, 8), np.nan, "float32")), "NaN or infinite"),
    (lambda: tf.data.Dataset.from_tensor_slices(np.zeros((0, 8), "float32")), "holds no rows"),
    (lambda: tf.data.Dataset.from_tensor_slices({"pixels": np.zeros((10, 8), "float32")}), "gives inputs ['pixels']"),
])
def test_a_saved_dataset_the_model_cannot_take_is_refused_in_one_line(task, tmp_path, saved, message):
    root, *_ = task
    saved().save(str(tmp_path / "bad"))
    result = CliRunner().invoke(main, ["analyze", str(root / "model.keras"), "--data", str(tmp_path / "bad")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and len(result.output.splitlines()) == 1


def _shards(folder):
    return [file for file in folder.rglob("*") if file.is_file() and file.parent.name.endswith(".shard")]


@pytest.mark.parametrize("damage, message", [
    (lambda folder: [shard.write_bytes(b"not a shard") for shard in _shards(folder)], "is damaged"),
    (lambda folder: (folder / "dataset_spec.pb").write_bytes(b"\x00\xff not a protobuf" * 8), "could not read"),
    (lambda folder: (folder / "dataset_spec.pb").write_bytes(b""), "could not read"),
    (lambda folder: (folder / "snapshot.metadata").write_bytes(b"\x12\x34 nonsense"), "could not read"),
    (lambda folder: (folder / "snapshot.metadata").unlink(), "could not read"),
])
def test_a_damaged_saved_dataset_is_refused_in_one_line(task, tmp_path, damage, message):
    root, *_ = task
    tf.data.Dataset.from_tensor_slices(np.zeros((10, 8), "float32")).save(str(tmp_path / "damaged"))
    damage(tmp_path / "damaged")
    result = CliRunner().invoke(main, ["analyze", str(root / "model.keras"), "--data", str(tmp_path / "damaged")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Op:" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_generator_function_is_read_once_per_pass_and_a_generator_refused(task):
    _, model, x, _ = task
    rule = StoppingRule("keep_ratio", 0.5)
    chunks = lambda: (x[start:start + 100] for start in range(0, ROWS, 100))  # noqa: E731
    _, from_function = prune(model, data=chunks, mode="data", rule=rule)
    _, from_array = prune(model, data=x, mode="data", rule=rule, hold_out_share=0)  # a stream is judged on its rows
    assert from_function.to_dict()["params_after"] == from_array.to_dict()["params_after"]
    assert from_function.checks["output_error"] == pytest.approx(from_array.checks["output_error"], rel=1e-6)
    with pytest.raises(InputError, match="generator function itself"):
        prune(model, data=chunks(), mode="data", rule=rule)


def test_finetune_trains_on_the_rows_of_a_saved_dataset(task):
    root, *_ = task
    result = CliRunner().invoke(main, ["prune", str(root / "model.keras"), "-o", str(root / "tuned.keras"), "--mode",
                                       "data", "--keep-ratio", "0.5", "--data", str(root / "batched"), "--finetune", "1"])
    assert result.exit_code == 0, result.output
    assert "after 1 epochs of fine-tuning" in result.output

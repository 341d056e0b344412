"""Unit tests of model files (`keras_embed.files.load`, `files.save`) and calibration arrays (`keras_embed.files.data`).

Loading: .keras and .h5 round trips, and Keras safe mode refusing a Lambda layer in both
formats. Writing: the format comes from the path, writes are atomic (no temporary file
is left beside the target, and a writer that fails half-way leaves the target as it
was), and a folder that is not a SavedModel is never replaced. Data: `check_inputs`
refuses arrays the model cannot take and casts the rest to the model dtype;
`load_array` reads .npy and .npz files.
"""

import os

import keras
import numpy as np
import pytest

from builders import inputs_for
from keras_embed.files.data import check_inputs, load_array
from keras_embed.errors import InputError
from keras_embed.files.load import load_model
from keras_embed.files.save import _WRITERS, check_output, output_format, save_model


@pytest.fixture(scope="module")
def model():
    model = keras.Sequential([
        keras.Input((5,), name="features"),
        keras.layers.Dense(4, activation="tanh", name="hidden"),
        keras.layers.Dropout(0.1, name="drop"),
        keras.layers.Dense(3, name="scores"),
    ], name="small")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.set_weights([rng.normal(size=weight.shape).astype("float32") for weight in layer.get_weights()])
    return model


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def layer_kinds(model):
    return [(layer.name, type(layer)) for layer in model.layers]


def listing(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["model.keras", "model.h5", "model.hdf5"])
def test_save_then_load_round_trip_keeps_layers_and_outputs(tmp_path, model, name):
    path = tmp_path / name
    assert save_model(model, path) == str(path)
    loaded = load_model(path)
    assert listing(tmp_path) == [name]  # no temporary file left beside it
    assert loaded.name == model.name
    assert layer_kinds(loaded) == layer_kinds(model)
    x = inputs_for(model, samples=32)
    np.testing.assert_array_equal(outputs(loaded, x), outputs(model, x))


def test_save_model_replaces_an_existing_file(tmp_path, model):
    path = tmp_path / "model.keras"
    path.write_bytes(b"old contents")
    save_model(model, path)
    assert listing(tmp_path) == ["model.keras"]
    assert load_model(path).count_params() == model.count_params()


# ---------------------------------------------------------------- failed writes


def failing_writer(make_partial):
    def write(model, path):
        make_partial(path)
        raise OSError("disk full (simulated)")

    return write


def partial_file(path):
    path.write_bytes(b"PK\x03\x04 half a model")


def partial_folder(path):
    path.mkdir()
    (path / "saved_model.pb").write_bytes(b"half")


@pytest.mark.parametrize("name, format, make_partial", [
    ("model.keras", "keras", partial_file),
    ("model.h5", "h5", partial_file),
    ("model.tflite", "tflite", partial_file),
    ("export/", "savedmodel", partial_folder),
], ids=["keras", "h5", "tflite", "savedmodel"])
def test_failed_write_leaves_nothing_at_the_target_and_no_temporary_file(tmp_path, model, monkeypatch, name, format,
                                                                           make_partial):
    monkeypatch.setitem(_WRITERS, format, failing_writer(make_partial))
    with pytest.raises(OSError, match="simulated"):
        save_model(model, f"{tmp_path}/{name}")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name, format", [("model.keras", "keras"), ("model.h5", "h5")])
def test_failed_write_leaves_an_existing_target_byte_identical(tmp_path, model, monkeypatch, name, format):
    target = tmp_path / name
    save_model(model, target)
    before = target.read_bytes()
    monkeypatch.setitem(_WRITERS, format, failing_writer(partial_file))

    with pytest.raises(OSError, match="simulated"):
        save_model(model, target)

    assert target.read_bytes() == before
    assert listing(tmp_path) == [name]


def test_failed_write_leaves_an_existing_savedmodel_folder_as_it_was(tmp_path, model, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    (export / "saved_model.pb").write_bytes(b"the old export")
    monkeypatch.setitem(_WRITERS, "savedmodel", failing_writer(partial_folder))
    with pytest.raises(OSError, match="simulated"):
        save_model(model, f"{export}/")
    assert listing(tmp_path) == ["export"]
    assert listing(export) == ["saved_model.pb"]
    assert (export / "saved_model.pb").read_bytes() == b"the old export"


@pytest.mark.parametrize("name", ["notes/", "model.keras"])
def test_save_model_never_deletes_a_folder_that_is_not_a_savedmodel(tmp_path, model, name):
    folder = tmp_path / name.rstrip("/")
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(InputError):
        save_model(model, f"{tmp_path}/{name}")
    assert (folder / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- output format and checks


@pytest.mark.parametrize("path, format, expected", [
    ("out/model.keras", None, "keras"),
    ("out/MODEL.KERAS", None, "keras"),
    ("model.h5", None, "h5"),
    ("model.hdf5", None, "h5"),
    ("model.tflite", None, "tflite"),
    ("exported/", None, "savedmodel"),
    ("exported.keras/", None, "savedmodel"),
    ("model.bin", "h5", "h5"),
    ("model.keras", "keras", "keras"),
])
def test_output_format_comes_from_the_path_unless_given(path, format, expected):
    assert output_format(path, format) == expected


@pytest.mark.parametrize("path, format, problem", [
    ("model.pb", None, "cannot tell the format"),
    ("model", None, "cannot tell the format"),
    ("model.keras", "pb", "unknown format 'pb'"),
    ("model.keras", "tflite", "make them agree"),
    ("model.h5", "keras", "make them agree"),
])
def test_output_format_refuses_what_it_cannot_write(path, format, problem):
    with pytest.raises(InputError, match=problem):
        output_format(path, format)


@pytest.mark.parametrize("name", ["stuff/", "stuff.keras"])
def test_check_output_refuses_an_existing_folder_that_is_not_a_savedmodel(tmp_path, name):
    folder = tmp_path / name.rstrip("/")
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    path = f"{folder}/" if name.endswith("/") else str(folder)
    with pytest.raises(InputError, match="not a SavedModel"):
        check_output(path)
    assert listing(folder) == ["notes.txt"]


def test_check_output_replaces_an_existing_savedmodel_folder_or_file_only_with_overwrite(tmp_path):
    export, model = tmp_path / "export", tmp_path / "old.keras"
    export.mkdir()
    (export / "saved_model.pb").write_bytes(b"")
    model.write_bytes(b"old model")
    for existing in (f"{export}/", model):
        with pytest.raises(InputError, match="already exists; pass --overwrite"):
            check_output(existing)
    assert check_output(f"{export}/", overwrite=True) == "savedmodel"
    assert check_output(model, overwrite=True) == "keras"
    assert check_output(tmp_path / "new.keras") == "keras"


@pytest.mark.parametrize("output, problem", [
    ("{input}", "is also the model input"),
    ("{tmp}/missing/out.keras", "does not exist"),
    ("{tmp}/", "holding the input"),  # though it holds a saved_model.pb
], ids=["same-as-input", "missing-folder", "folder-of-the-input"])
def test_check_output_refuses_paths_that_would_clobber_or_cannot_exist(tmp_path, output, problem):
    source = tmp_path / "model.keras"
    source.write_bytes(b"model")
    (tmp_path / "saved_model.pb").write_bytes(b"")
    with pytest.raises(InputError, match=problem):
        check_output(output.format(input=source, tmp=tmp_path), input_path=source)


# ---------------------------------------------------------------- safe mode


@pytest.fixture(scope="module", params=[".keras", ".h5"])
def lambda_model_path(request, tmp_path_factory):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Lambda(lambda t: 2.0 * t, name="doubling"),
                              keras.layers.Dense(3)])
    path = tmp_path_factory.mktemp("lambda") / f"lambda{request.param}"
    model.save(path)
    return path


@pytest.mark.filterwarnings("ignore:The object being serialized includes a `lambda`")
def test_lambda_model_is_refused_under_safe_mode(lambda_model_path):
    before = lambda_model_path.read_bytes()
    with pytest.raises(InputError, match="safe mode"):
        load_model(lambda_model_path)
    with pytest.raises(ValueError, match="safe_mode"):  # Keras itself refuses; this is not our wrapper only
        keras.saving.load_model(lambda_model_path, compile=False, safe_mode=True)
    assert lambda_model_path.read_bytes() == before


def test_lambda_model_loads_and_runs_its_code_when_unsafe(lambda_model_path):
    loaded = load_model(lambda_model_path, unsafe=True)
    assert loaded.get_layer("doubling").__class__ is keras.layers.Lambda
    x = np.ones((2, 5), "float32")
    np.testing.assert_allclose(outputs(loaded.get_layer("doubling"), x), 2.0 * x)


@pytest.mark.parametrize("name, content, problem", [
    ("missing.keras", None, "not found"),
    ("empty.keras", b"", "empty"),
    ("noise.keras", b"not a zip archive at all", "truncated or corrupt"),
    ("noise.h5", b"not an hdf5 file either", "truncated or corrupt"),
    ("model.txt", b"text", "unknown model format"),
])
def test_load_model_refuses_unreadable_files_as_bad_input(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=problem):
        load_model(path)


# ---------------------------------------------------------------- calibration data


@pytest.mark.parametrize("x, problem", [
    (np.zeros((4, 6), "float32"), "shape"),
    (np.zeros((4, 5, 1), "float32"), "shape"),
    (np.zeros(5, "float32"), "shape"),
    (np.where(np.eye(3, 5) > 0, np.nan, 0.0), "NaN"),
    (np.where(np.eye(3, 5) > 0, -np.inf, 0.0), "infinite"),
    (np.zeros((0, 5), "float32"), "no samples"),
    (np.float32(1.0), "no samples"),
    (np.full((2, 5), "1.0"), "numeric"),
    (np.array([[object()] * 5]), "numeric"),
], ids=["too-many-features", "extra-axis", "one-row-without-batch-axis", "nan", "inf", "empty", "scalar", "strings",
        "objects"])
def test_check_inputs_refuses_data_the_model_cannot_take(model, x, problem):
    with pytest.raises(InputError, match=problem):
        check_inputs(x, model)


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32", "bool"])
def test_check_inputs_casts_to_the_model_input_dtype(model, dtype):
    x = (np.arange(10).reshape(2, 5) % 2).astype(dtype)
    checked = check_inputs(x, model)
    assert checked.dtype == np.float32
    np.testing.assert_array_equal(checked, x.astype(np.float32))


def test_check_inputs_keeps_a_float64_model_in_float64():
    model = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.Dense(2, dtype="float64")])
    x = np.random.default_rng(0).standard_normal((4, 3))
    checked = check_inputs(x.astype("float32"), model)
    assert checked.dtype == np.float64
    np.testing.assert_array_equal(checked, x.astype("float32").astype("float64"))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_check_inputs_refuses_values_that_overflow_the_model_dtype():
    model = keras.Sequential([keras.Input((2,), dtype="float16"), keras.layers.Dense(2, dtype="float16")])
    with pytest.raises(InputError):
        check_inputs(np.full((1, 2), 1e6), model)


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
def test_check_inputs_refuses_complex_data(model):
    with pytest.raises(InputError, match="numeric|complex|real"):
        check_inputs(np.ones((2, 5)) * (1 + 1j), model)


@pytest.fixture
def array():
    return np.random.default_rng(3).standard_normal((6, 5)).astype("float32")


def test_load_array_reads_npy(tmp_path, array):
    np.save(tmp_path / "x.npy", array)
    np.testing.assert_array_equal(load_array(tmp_path / "x.npy"), array)


def test_load_array_reads_key_x_of_npz_even_when_not_first(tmp_path, array):
    np.savez(tmp_path / "data.npz", a_first=np.zeros(3), x=array, y=np.arange(6))
    np.testing.assert_array_equal(load_array(tmp_path / "data.npz"), array)


def test_load_array_reads_the_first_array_of_npz_without_x(tmp_path, array):
    np.savez(tmp_path / "data.npz", features=array, labels=np.arange(6))
    np.testing.assert_array_equal(load_array(tmp_path / "data.npz"), array)


@pytest.mark.parametrize("name, write, problem", [
    ("missing.npy", None, "not found"),
    ("x.csv", lambda path: path.write_text("1,2,3"), "unknown data format"),
    ("empty.npz", lambda path: np.savez(path), "holds no arrays"),
    ("broken.npy", lambda path: path.write_bytes(b"\x93NUMPY garbage"), "could not read"),
    ("objects.npy", lambda path: np.save(path, np.array([{"a": 1}]), allow_pickle=True), "could not read"),
], ids=["missing", "csv", "empty-npz", "corrupt", "pickled-objects"])
def test_load_array_refuses_unreadable_files_as_bad_input(tmp_path, name, write, problem):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(InputError, match=problem):
        load_array(path)

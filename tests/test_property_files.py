"""Fuzz of the model and data loaders with damaged files (hypothesis).

Valid files are damaged the way disks, downloads and attackers do: bits flipped, bytes
inserted, overwritten, deleted or cut off, and values of a .keras archive's config.json
replaced. Loading must then refuse with a documented error (a `KerasEmbedError` with exit
code 2 to 4 and a one-line message) or give back what the file held; the command line must
never fail otherwise (exit 1), and a model it writes must compute what its report says.

`make test` runs a few examples per property (loading a model costs 10-400 ms); `make fuzz`
sets KERAS_EMBED_FUZZ_EXAMPLES=2000.
"""

import functools
import io
import json
import operator
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import examples
from keras_embed.files import load as model_load
from keras_embed.files.data import check_inputs, load_data
from keras_embed.errors import KerasEmbedError
from keras_embed.model.read import read_model
from keras_embed.tools.cli import main
from keras_embed.verify import calibration_inputs

NARROW = Path(__file__).resolve().parents[1] / "saved_models" / "digits_narrow.keras"
NARROW_BYTES = NARROW.read_bytes()
DAMAGE = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "overwrite", "delete", "truncate"]), st.integers(0, 2**31),
              st.binary(min_size=1, max_size=16)),
    min_size=1, max_size=4,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=10)
    | st.sampled_from(["Dense", "Lambda", "Sequential", "relu", "softmax", "float64", "mixed_float16"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=5,
)
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def damage(content, operations):
    """`content` after each (kind, where, payload) operation; `where` wraps around."""
    data = bytearray(content)
    for kind, where, payload in operations:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << (payload[0] % 8)
        elif kind == "insert":
            data[at:at] = payload
        elif kind == "overwrite":
            data[at:at + len(payload)] = payload
        elif kind == "delete":
            del data[at:at + payload[0] % 64 + 1]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def refused_or(load):
    """`load()`, or None when it raised a documented, one-line `KerasEmbedError`."""
    try:
        return load()
    except KerasEmbedError as error:
        assert error.exit_code in (2, 3, 4)
        assert str(error) and "\n" not in str(error)
        return None


def outputs(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def archive_with_config(path, config_text):
    """The narrow digits archive with config.json replaced (a valid zip, CRCs included)."""
    with zipfile.ZipFile(NARROW) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info, config_text if info.filename == "config.json" else source.read(info))


def config_paths(node, path=()):
    """Every path (tuple of keys and indices) into a parsed JSON value, the root first."""
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from config_paths(child, (*path, key))


def npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


X = np.random.default_rng(0).uniform(0.0, 1.0, (6, 64)).astype("float32")
Y = np.arange(6)
NPZ_BYTES = npz_bytes(x=X, y=Y)
NPY_BYTES = (lambda buffer: np.save(buffer, X) or buffer.getvalue())(io.BytesIO())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def narrow():
    model = keras.saving.load_model(NARROW)
    return model, outputs(model, X)


@pytest.fixture(scope="module")
def narrow_input(narrow):
    """The input node of the narrow digits graph: what `check_inputs` checks data against."""
    (node,) = read_model(narrow[0]).inputs
    assert (node.shape, node.dtype) == ((64,), "float32")
    return node


@pytest.fixture(scope="module")
def h5_bytes(scratch):
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]).save(
        scratch / "source.h5")
    return (scratch / "source.h5").read_bytes()


@pytest.fixture(scope="module")
def short_hdf5_timeout():
    saved, model_load.HDF5_TIMEOUT = model_load.HDF5_TIMEOUT, 5
    yield
    model_load.HDF5_TIMEOUT = saved


# ---------------------------------------------------------------- model files


@settings(max_examples=examples(200), **FUZZ)
@given(operations=DAMAGE)
def test_property_damaged_keras_archive_is_refused_or_loads_intact(scratch, narrow, operations):
    path = scratch / "damaged.keras"
    path.write_bytes(damage(NARROW_BYTES, operations))
    model = refused_or(lambda: model_load.load_model(path))
    if model is not None:  # the zip CRCs let no changed byte of a member through
        np.testing.assert_array_equal(outputs(model, X), narrow[1])


@settings(max_examples=examples(10), **FUZZ)
@given(operations=DAMAGE)
def test_property_damaged_h5_file_is_refused_or_loads(scratch, h5_bytes, short_hdf5_timeout, operations):
    """HDF5 has no checksums: a damaged .h5 may load with other weights, but never hangs or
    fails otherwise."""
    path = scratch / "damaged.h5"
    path.write_bytes(damage(h5_bytes, operations))
    refused_or(lambda: model_load.load_model(path))


@settings(max_examples=examples(50), **FUZZ)
@given(data=st.data())
def test_property_prune_of_an_archive_with_a_damaged_config_exits_cleanly_and_writes_what_it_verified(
        scratch, data):
    config = json.loads(zipfile.ZipFile(NARROW).read("config.json"))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        *parents, key = data.draw(st.sampled_from(list(config_paths(config))[1:]), label="path")
        parent = functools.reduce(operator.getitem, parents, config)
        if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
            del parent[key]
        else:
            parent[key] = data.draw(JSON_VALUES, label="value")
    text = json.dumps(config).encode()
    if data.draw(st.booleans(), label="damage the text too"):
        text = damage(text, data.draw(DAMAGE, label="text damage"))
    model, output = scratch / "edited.keras", scratch / "pruned.keras"
    archive_with_config(model, text)

    result = CliRunner().invoke(main, ["prune", str(model), "-o", str(output), "--overwrite", "--json"])

    assert result.exit_code in (0, 2, 3, 4), result.output
    if result.exit_code != 0:
        assert len(result.stderr.strip().splitlines()) == 1 or result.stderr.startswith("Usage:"), result.stderr
        return
    report = json.loads(result.stdout)
    original = model_load.load_model(model)
    x = calibration_inputs(original)
    written = keras.saving.load_model(output)
    assert np.abs(outputs(written, x) - outputs(original, x)).max() <= report["atol"]


# ---------------------------------------------------------------- data files


@settings(max_examples=examples(200), **FUZZ)
@given(operations=DAMAGE)
def test_property_damaged_npz_is_refused_or_loads_intact(scratch, operations):
    path = scratch / "damaged.npz"
    path.write_bytes(damage(NPZ_BYTES, operations))
    loaded = refused_or(lambda: load_data(path))
    if loaded is not None:  # the zip CRCs guard the contents; a damaged member *name* only hides y
        np.testing.assert_array_equal(loaded[0], X)
        if loaded[1] is not None:
            np.testing.assert_array_equal(loaded[1], Y)


@settings(max_examples=examples(200), **FUZZ)
@given(operations=DAMAGE)
def test_property_damaged_npy_is_refused_or_checked(scratch, narrow_input, operations):
    """A .npy has no checksum: what loads must still pass or fail `check_inputs` cleanly."""
    path = scratch / "damaged.npy"
    path.write_bytes(damage(NPY_BYTES, operations))
    loaded = refused_or(lambda: load_data(path))
    if loaded is not None:
        refused_or(lambda: check_inputs(loaded[0], narrow_input))

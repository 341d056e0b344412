"""What keras-embed guarantees about untrusted model and data files (README: Security).

- No code path unpickles, evals or execs: the package sources hold none of it.
- Keras safe mode is on for every load unless the caller asks for `unsafe`.
- No member of a .keras archive is written outside an extraction folder: names that are
  absolute or climb out with '..' make the file refused before Keras opens it.
- A config declaring far more weights than the file stores is refused before Keras
  allocates them, and a damaged .h5 that sends the HDF5 library into an endless loop is
  stopped after a timeout instead of hanging the command.
"""

import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import keras
import pytest

from keras_embed import io as model_io
from keras_embed.errors import InputError
from keras_embed.io import declared_weights, load_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for folder in ("keras_embed", "tools", "callbacks") for path in (ROOT / folder).rglob("*.py"))
WIDENED = ROOT / "saved_models" / "digits_widened.keras"
FORBIDDEN = {
    "pickle": r"\b(c?pickle|dill|marshal|shelve|joblib)\b",
    "eval": r"(?<![\w.])eval\s*\(",
    "exec": r"(?<![\w.])exec\s*\(",
    "dynamic import": r"__import__\s*\(",
    "numpy pickles": r"allow_pickle\s*=\s*True",
    "safe mode off": r"safe_mode\s*=\s*False|enable_unsafe_deserialization",
}


def test_the_sources_are_found():
    assert len(SOURCES) > 20 and ROOT / "keras_embed" / "io.py" in SOURCES


@pytest.mark.parametrize("what", FORBIDDEN)
def test_no_source_unpickles_evals_or_execs(what):
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in SOURCES for number, line in enumerate(path.read_text().splitlines(), start=1)
             if re.search(FORBIDDEN[what], line)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("unsafe", [False, True])
def test_load_model_passes_safe_mode_unless_asked_not_to(monkeypatch, unsafe):
    seen = {}
    monkeypatch.setattr(keras.saving, "load_model", lambda path, **options: seen.update(options))
    load_model(WIDENED, unsafe=unsafe)
    assert seen == {"compile": False, "safe_mode": not unsafe}


def archive_with_member(path, name):
    shutil.copyfile(WIDENED, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(name, b"written outside the archive's folder")


@pytest.mark.parametrize("name", ["../../evil.txt", "assets/../../../evil.txt", "/tmp/keras-embed-evil.txt",
                                  "..\\..\\evil.txt", "C:/evil.txt"])
@pytest.mark.parametrize("unsafe", [False, True])
def test_archive_members_that_escape_are_refused_and_nothing_is_written(tmp_path, monkeypatch, name, unsafe):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # Keras extracts under the temp folder
    model = work / "model.keras"
    archive_with_member(model, name)
    before = sorted(str(path) for path in tmp_path.rglob("*"))

    with pytest.raises(InputError, match="points outside the archive"):
        load_model(model, unsafe=unsafe)

    assert sorted(str(path) for path in tmp_path.rglob("*")) == before
    assert not Path("/tmp/keras-embed-evil.txt").exists()


def test_declared_weights_of_a_real_config_are_its_dense_weights():
    config = zipfile.ZipFile(WIDENED).read("config.json")
    model = keras.saving.load_model(WIDENED)
    assert declared_weights(config) == model.count_params()
    assert declared_weights(b"not json") == 0


def test_a_config_declaring_a_billion_units_is_refused_before_keras_builds_it(tmp_path, monkeypatch):
    model = tmp_path / "huge.keras"
    config = json.loads(zipfile.ZipFile(WIDENED).read("config.json"))
    config["config"]["layers"][1]["config"]["units"] = 10**9
    with zipfile.ZipFile(WIDENED) as source, zipfile.ZipFile(model, "w") as target:
        for info in source.infolist():
            target.writestr(info, json.dumps(config) if info.filename == "config.json" else source.read(info))
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **options: pytest.fail("Keras was reached"))
    with pytest.raises(InputError, match="declares 65000002134 weights"):
        load_model(model)


def test_a_damaged_h5_that_hangs_the_hdf5_library_is_stopped(tmp_path, monkeypatch):
    """One byte inserted into the config text inside the HDF5 global heap makes libhdf5
    loop forever (found by the loader fuzz); the isolated first read times out instead."""
    source = tmp_path / "source.h5"
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]).save(source)
    content = source.read_bytes()
    where = content.index(b'{"module"', content.index(b"GCOL")) + 10
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(content[:where] + b"\xfc" + content[where:])
    monkeypatch.setattr(model_io, "HDF5_TIMEOUT", 3)

    start = time.monotonic()
    with pytest.raises(InputError, match="did not finish in 3 s"):
        load_model(damaged)
    assert time.monotonic() - start < 30
    assert load_model(source).count_params() == 18  # an intact file still loads


def test_the_isolated_hdf5_read_does_not_import_from_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "h5py.py").write_text("raise SystemExit(99)\n")
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model.h5"
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]).save(model)
    assert load_model(model).count_params() == 18
    assert sorted(os.listdir(tmp_path)) == ["h5py.py", "model.h5"]

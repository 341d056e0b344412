"""Model files in: safe loading, and the checks that come before it.

Loading always uses Keras safe mode unless the caller opts out, and refuses files whose
archive members point outside the archive, whose config declares far more weights than
the file stores (Keras would allocate them before failing), or whose members or HDF5
datasets declare to inflate far past what the file stores and the config needs (bombs).
An .h5 file's metadata is read in a child process first (a damaged heap can hang libhdf5).
Keras extracts archives into a private temporary folder, removed however the load ends.

Example:
    >>> model = load_model("saved_models/digits_widened.keras")
"""

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import h5py
import keras

from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.files.archives import open_member
from keras_embed.files.config_weights import declared, declared_weights  # noqa: F401 (declared_weights: API)

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_CONFIG_LIMIT = 16 * 2**20  # the largest config read: stock models' configs stay under 1 MiB
_METADATA_LIMIT = 2**20  # metadata.json: a Keras version and a date
_WEIGHTS_MEMBERS = ("model.weights.h5", "model.weights.npz")
_WEIGHTS_PER_BYTE = 8  # generous: a quantized layer stores one weight in half a byte
_BYTES_PER_WEIGHT = 32  # generous: a float64 weight, two optimizer slots and a moving average
_BYTES_PER_OBJECT = 16 * 2**10  # HDF5 groups and headers, per object the config serializes
_MEMBER_EXPANSION = 32  # trained weights deflate about 1.1 times, text about 4: more is a bomb
_SLACK_BYTES = 2**20
_TAMPERED = "it is corrupt or was tampered with: do not use it, re-save the model with model.save()"
HDF5_TIMEOUT = 30  # seconds the isolated first read of an .h5 file's metadata may take
_HDF5_PROBE = """
import json, sys, h5py
outside = []
def check_link(name, link):
    if isinstance(link, h5py.ExternalLink):
        outside.append(f"an external link {ascii(name)} to the file {ascii(link.filename)}")
def check_object(name, item):
    for key in item.attrs:
        item.attrs[key]
    if isinstance(item, h5py.Dataset) and item.external:
        outside.append(f"a dataset {ascii(name)} stored in the file {ascii(item.external[0][0])}")
    elif isinstance(item, h5py.Dataset) and item.is_virtual:
        source = item.virtual_sources()[0].file_name
        outside.append(f"a virtual dataset {ascii(name)} mapped from the file {ascii(source)}")
with h5py.File(sys.argv[1], "r") as file:
    check_object("/", file)
    file.visititems(check_object)
    file.visititems_links(check_link)
    config, version = file.attrs.get("model_config"), file.attrs.get("keras_version")
text = lambda value: value.decode() if isinstance(value, bytes) else str(value or "")
sys.stdout.write(json.dumps({"config": text(config), "keras_version": text(version),
                            "outside": outside[0] if outside else None}))
"""


def _first_line(error, limit=200):
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_model_path(path):
    if not path.exists():
        raise InputError(f"model file '{path}' not found; check the path")
    if path.is_dir():
        if (path / "keras_metadata.pb").exists() or (path / "saved_model.pb").exists():
            raise UnsupportedLayerError(
                f"'{path}' is a SavedModel, which keeps no Keras layers; pass the .keras or .h5 file it came from"
            )
        raise InputError(f"'{path}' is a folder, not a model file; pass a .keras or .h5 file")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise InputError(f"unknown model format '{path.suffix or path.name}' of '{path}'; pass a .keras or .h5 file")
    if path.stat().st_size == 0:
        raise InputError(f"model file '{path}' is empty; re-save the model with model.save()")
    kinds = {".keras": zipfile.is_zipfile(path), ".h5": h5py.is_hdf5(path)}
    expected = ".keras" if path.suffix.lower() == ".keras" else ".h5"
    if not kinds[expected]:
        actual = next((suffix for suffix, found in kinds.items() if found), None)
        if actual is not None:
            raise InputError(f"model file '{path}' is a {actual} file despite its name; rename it to end in {actual}")
        kind = "a .keras archive (zip)" if expected == ".keras" else "an HDF5 file"
        raise InputError(f"model file '{path}' is not {kind}: truncated or corrupt; re-save it with model.save()")
    _check_contents(path)


def _escapes(name):
    """Whether an archive member would be extracted outside its folder (absolute or '..')."""
    member = PureWindowsPath(name)  # reads '/' and '\\' separators and drive letters alike
    return bool(member.drive or member.root) or ".." in member.parts


def hdf5_metadata(path):
    """{'config': model config text, 'keras_version': writer's Keras version} of an .h5 file,
    read with every attribute in a child process first.

    A damaged file can send the HDF5 library into an endless loop that no Python code can
    interrupt (found by fuzzing: one byte inserted into the config text); the child is
    stopped after `HDF5_TIMEOUT` seconds instead. A file whose data lives in other files
    (a dataset with external storage, a virtual dataset, an external link) is refused:
    reading its weights would read those files (Keras 3 refuses them too; tf_keras does not).

    Raises:
        InputError: the file is damaged, its metadata did not come in time, or it refers
            to other files.
    """
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _HDF5_PROBE, str(path)], capture_output=True,
                              timeout=HDF5_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InputError(f"model file '{path}' is a damaged HDF5 file: reading its metadata did not finish in "
                         f"{HDF5_TIMEOUT} s; re-save it with model.save()") from None
    if done.returncode != 0:
        reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["it crashed the reader"])[-1]
        raise InputError(f"model file '{path}' is a damaged HDF5 file ({_first_line(reason)}); "
                         "re-save it with model.save()")
    metadata = json.loads(done.stdout.decode(errors="replace"))
    outside = metadata.pop("outside")
    if outside:
        raise InputError(f"model file '{path}' holds {outside}, which keras-embed does not read (a model file must "
                         "hold its own data); it is corrupt or was tampered with: do not use it, re-save the model "
                         "with model.save()")
    return metadata


def _member_key(name):
    """An archive member's name as the file system it is extracted to may see it: one
    separator, no '.' parts, no case."""
    return tuple(part.casefold() for part in PurePosixPath(name.replace("\\", "/")).parts)


def _check_members(path, members):
    """Refuses archive members Keras would misread or extract outside its folder: names
    that escape, names given twice (zipfile reads the last, a check the first), and sizes
    the file cannot hold (stored bytes past its end, overlapping members)."""
    escaping = [member.filename for member in members if _escapes(member.filename)]
    if escaping:
        raise InputError(f"model file '{path}' holds an archive member '{escaping[0]}' that points outside the "
                         f"archive; {_TAMPERED}")
    seen = set()
    for member in members:
        if _member_key(member.filename) in seen:
            raise InputError(f"model file '{path}' holds the archive member '{member.filename}' twice; {_TAMPERED}")
        seen.add(_member_key(member.filename))
    stored, size = sum(member.compress_size for member in members), path.stat().st_size
    if stored > size:
        raise InputError(f"model file '{path}' is {size} bytes but its archive members claim {stored} stored bytes; "
                         f"{_TAMPERED}")


def _check_fixed_limit(path, member, limit):
    if member is not None and member.file_size > limit:
        raise InputError(f"model file '{path}' holds a {member.file_size}-byte {member.filename}, more than the "
                         f"{limit} bytes keras-embed reads; {_TAMPERED}")


def _config_and_stored_bytes(path):
    """(config JSON text or None, bytes stored besides it, archive members) of a .keras or
    .h5 file (no members for .h5). A member counts with the bytes it occupies in the file,
    however far it declares to inflate; config.json and metadata.json are read only when
    they declare at most `_CONFIG_LIMIT` and `_METADATA_LIMIT` bytes (zipfile stops
    inflating a member at its declared size)."""
    if path.suffix.lower() != ".keras":
        return hdf5_metadata(path)["config"], path.stat().st_size, []
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        _check_members(path, members)
        found = {member.filename: member for member in members}
        config = found.get("config.json")
        _check_fixed_limit(path, config, _CONFIG_LIMIT)
        _check_fixed_limit(path, found.get("metadata.json"), _METADATA_LIMIT)
        text = archive.read(config) if config is not None else None
        stored = sum(min(member.file_size, member.compress_size) for member in members if member is not config)
        return text, stored, members


def _weights_need(config):
    """The most bytes a weights member needs for what `config` (`Declared`) declares."""
    return _BYTES_PER_WEIGHT * config.weights + _BYTES_PER_OBJECT * config.objects + _SLACK_BYTES


def _check_inflation(path, members, config):
    """Refuses zip bombs: members (but config.json and metadata.json, under their fixed
    limits) declaring to inflate past `_MEMBER_EXPANSION` times their stored size, the
    weights member also past what the config's weights need. A member may always hold its
    stored size. zipfile, and so Keras, stops inflating a member at its declared size."""
    for member in members:
        if member.filename in ("config.json", "metadata.json"):
            continue
        allowed = _MEMBER_EXPANSION * member.compress_size + _SLACK_BYTES
        limit = f"{_MEMBER_EXPANSION} times its stored size"
        if member.filename in _WEIGHTS_MEMBERS and _weights_need(config) < allowed:
            allowed, limit = _weights_need(config), f"what its config's {config.weights} weights need"
        if member.file_size > max(member.compress_size, allowed):
            raise InputError(f"model file '{path}' holds the archive member '{member.filename}' that inflates from "
                             f"{member.compress_size} to {member.file_size} bytes, more than {limit} ({allowed} "
                             "bytes): it is a zip bomb or was tampered with: do not use it, re-save the model with "
                             "model.save()")


def _check_contents(path):
    """Refuses what Keras would act on before its own checks: archive members that escape
    the extraction folder, are given twice or inflate past what the config implies (zip
    bombs), oversized configs, configs declaring far more weights than the file stores,
    and (.keras) weight-carrying layers without the build_config they are counted by."""
    try:
        text, stored, members = _config_and_stored_bytes(path)
    except InputError:
        raise
    except Exception:  # unreadable: Keras's own error follows, mapped in load_model
        return
    config = declared(text)
    if members and config.unbuilt:
        raise InputError(f"model file '{path}' gives layer '{config.unbuilt[0]}' no build_config, which Keras records "
                         f"for every layer it built: its weights cannot be counted before Keras allocates them; "
                         f"{_TAMPERED}")
    if config.weights > _WEIGHTS_PER_BYTE * (stored + _SLACK_BYTES):
        raise InputError(
            f"model file '{path}' declares {config.weights} weights but stores only {stored} bytes; "
            "it is corrupt or was tampered with: re-save the model with model.save()"
        )
    _check_inflation(path, members, config)
    _check_stored_weights(path, members, config)


def _declared_past_stored(source):
    """Bytes the datasets of an HDF5 weights file declare beyond what they store (fill
    values, compressed chunks, storage elsewhere): what reading them allocates beyond the
    file's own bytes."""
    excess = []

    def add(name, item):
        if isinstance(item, h5py.Dataset):
            excess.append(max(0, item.size * item.dtype.itemsize - item.id.get_storage_size()))

    with h5py.File(source, "r") as file:
        file.visititems(add)
    return sum(excess)


def _check_stored_weights(path, members, config):
    """Refuses HDF5 weights (an .h5 file, or a .keras file's weights member) whose datasets
    declare more than they store by more than the config's weights need or
    `_MEMBER_EXPANSION` times the file: Keras reads a dataset whole before comparing it
    with its weight."""
    weights = next((member for member in members if member.filename == "model.weights.h5"), None)
    if members and weights is None:  # weights in .npz, or none
        return
    try:
        if weights is None:
            excess, size = _declared_past_stored(path), path.stat().st_size
        else:
            with zipfile.ZipFile(path) as archive, open_member(path, archive, weights) as source:
                excess, size = _declared_past_stored(source), weights.compress_size
    except Exception:  # unreadable: Keras's own error follows, mapped in load_model
        return
    allowed = min(_weights_need(config), _MEMBER_EXPANSION * size + _SLACK_BYTES)
    if excess > allowed:
        raise InputError(f"model file '{path}' holds weights declaring {excess} bytes more than they store, more than "
                         f"the {allowed} bytes its config's {config.weights} weights may need; {_TAMPERED}")


def check_model_file(path):
    """Refuses a model file that `load_model` would refuse before reading it (see there).

    Example:
        >>> check_model_file("missing.keras")
        InputError: model file 'missing.keras' not found; check the path
    """
    _check_model_path(Path(path))


_TEMPORARY_FOLDER_LOCK = threading.RLock()


@contextlib.contextmanager
def _private_temporary_folder():
    """Points `tempfile` at a new private folder for the block and removes that folder when
    the block ends, however it ends: Keras extracts a `.keras` archive's members into
    `tempfile.mkdtemp()` folders (`saving_lib.get_temp_dir`) and leaves them behind when
    the extraction or the load fails. One block at a time: `tempfile.tempdir` is global."""
    with _TEMPORARY_FOLDER_LOCK:
        folder, previous = tempfile.mkdtemp(prefix="keras-embed-"), tempfile.tempdir
        tempfile.tempdir = folder
        try:
            yield folder
        finally:
            tempfile.tempdir = previous
            shutil.rmtree(folder, ignore_errors=True)


def load_model(path, unsafe=False):
    """Loads a `.keras` or `.h5` model, uncompiled, in Keras safe mode.

    Args:
        path: the model file.
        unsafe: turn safe mode off. Safe mode refuses to run code stored in the file
            (Lambda layers, pickled functions): only for files you trust.

    Keras' extraction folders go into a private temporary folder that is removed when the
    load ends, failed or interrupted (SIGTERM too, where the CLI turns it into an exception).

    Raises:
        InputError: missing, empty, corrupt or code-carrying files, unknown extensions,
            archive members that point outside the archive, configs declaring far more
            weights than the file stores, .h5 files whose metadata cannot be read in
            `HDF5_TIMEOUT` seconds.
        UnsupportedLayerError: custom layer classes Keras cannot find.
    """
    path = Path(path)
    _check_model_path(path)
    try:
        with _private_temporary_folder():
            return keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as error:  # Keras raises many types for unreadable files
        message = str(error)
        if "safe_mode" in message or "unsafe" in message.lower():
            raise InputError(
                f"model '{path}' holds code (e.g. a Lambda layer) that safe mode refuses to run; "
                "pass --unsafe only if you trust the file"
            ) from None
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", message)
        if missing or "Unknown layer" in message:
            raise UnsupportedLayerError(
                f"model '{path}' uses a custom class keras-embed cannot load "
                f"({missing.group(1) if missing else _first_line(error)}); "
                "only stock Keras layers are supported: rebuild the model from them"
            ) from None
        raise InputError(
            f"could not read model '{path}' ({_first_line(error)}): it is incomplete, corrupt or not a Keras model; "
            "re-save it with model.save()"
        ) from None

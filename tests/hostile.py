"""Hostile files: model and data files for the memory tests, built small (issue 15, items
5-7), and special files where an output goes (item 3: `fifo`, `device`, `unix_socket`).

Each maker writes one file at `path` that would make an unguarded reader allocate
`gibibytes` or more (a layer Keras builds, a zip member it inflates, an array numpy
allocates), while the file itself stays a few MB at most and takes well under a second
to write: zip members inflating to gigabytes are crafted as one compressed block
repeated (`deflated_repeats`), not compressed from gigabytes of input. Their CRCs are
not computed: a guard must refuse them before inflating a byte, from the sizes declared.

Example:
    >>> weights_bomb(tmp_path / "bomb.keras", gibibytes=3)       # 3 MB on disk
"""

import io
import json
import os
import socket
import stat
import warnings
import zipfile
import zlib
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

WIDENED = Path(__file__).resolve().parents[1] / "saved_models" / "digits_widened.keras"
MiB, GiB = 2**20, 2**30


def deflated_repeats(prefix, unit, count):
    """A raw deflate stream inflating to `prefix` then `count` copies of `unit`: each copy
    is one block compressed once, with no reference outside itself, so the stream takes
    about len(unit) / 1000 bytes per copy."""

    def flushed(data):
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)

    return flushed(prefix) + flushed(unit) * count + b"\x03\x00"  # 03 00: an empty final block


def write_archive(path, members, bombs=()):
    """A zip of `members` (name, bytes; several of one name allowed), then `bombs` (name,
    raw deflate stream, inflated size): written stored, then relabelled deflated."""
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # wanted here
        for name, content in [*members, *[(name, stream) for name, stream, _ in bombs]]:
            archive.writestr(zipfile.ZipInfo(name), content)
    for name, _, inflated in bombs:
        relabel(path, name, method=zipfile.ZIP_DEFLATED, file_size=inflated)


def relabel(path, name, method=None, file_size=None, compress_size=None):
    """Rewrites what the local header and the central directory say of member `name`:
    its compression method and its inflated and compressed sizes (under 4 GiB)."""
    content = bytearray(Path(path).read_bytes())
    encoded = name.encode()
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(name).header_offset
    central = next(position for position in _find_all(content, b"PK\x01\x02")
                   if content[position + 46:position + 46 + len(encoded)] == encoded)
    for start, fields in ((local, (8, 18, 22)), (central, (10, 20, 24))):
        for offset, value, size in zip(fields, (method, compress_size, file_size), (2, 4, 4)):
            if value is not None:
                content[start + offset:start + offset + size] = value.to_bytes(size, "little")
    Path(path).write_bytes(bytes(content))


def _find_all(content, signature):
    position = content.find(signature)
    while position >= 0:
        yield position
        position = content.find(signature, position + 1)


def members_of(model_file, edit=None):
    """[(name, bytes)] of the members of a .keras file, config.json edited by `edit(config)`."""
    with zipfile.ZipFile(model_file) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    if edit is None:
        return members
    return [(name, json.dumps(edit(json.loads(content))).encode() if name == "config.json" else content)
            for name, content in members]


def widened_members(edit=None):
    """The members of the widened digits model, config.json edited by `edit(config)`."""
    return members_of(WIDENED, edit)


def saved_and_edited(model, path, edit):
    """Saves `model` as a .keras file at `path`, its config.json rewritten by `edit(config)`."""
    source = Path(path).with_name("source.keras")
    model.save(source)
    members = members_of(source, edit)
    source.unlink()
    write_archive(path, members)


def wide_first_dense(gibibytes):
    """A config edit: the widened digits model's first Dense (64 inputs) takes
    `gibibytes` GiB of float32 weights."""
    def edit(config):
        config["config"]["layers"][1]["config"]["units"] = int(gibibytes * GiB) // (4 * 65)
        return config

    return edit


# ---------------------------------------------------------------- models: the weights check


def padded_config(path, gibibytes=3, padding=17 * MiB):
    """A huge first Dense in a config.json padded with whitespace past 16 MiB (deflated:
    a few kB), the size up to which the weights check used to read configs."""
    members = widened_members(wide_first_dense(gibibytes))
    config = dict(members)["config.json"] + b" " * padding
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members:
            archive.writestr(name, config if name == "config.json" else content)


def second_config(path, gibibytes=3):
    """The digits config, then a second config.json member declaring a huge first Dense:
    zipfile (and Keras) read the last member of a name."""
    write_archive(path, [*widened_members(), ("config.json", dict(widened_members(wide_first_dense(gibibytes)))
                                               ["config.json"])])


def _unbuilt_flatten_config(config, rows, columns, units):
    """Input (rows, columns) -> Flatten -> Dense(units), neither with a build_config."""
    for layer in config["config"]["layers"]:
        layer.pop("build_config", None)
        if layer["class_name"] == "InputLayer":
            layer["config"]["batch_shape"] = [None, rows, columns]
        if layer["class_name"] == "Dense":
            layer["config"]["units"] = units
    config.pop("build_config", None)
    return config


def _flatten_model():
    return keras.Sequential([keras.Input((4, 2)), keras.layers.Flatten(), keras.layers.Dense(3)])


def flattened_unbuilt(path, gibibytes=3):
    """Input (40000, 8) -> Flatten -> Dense without build_config: Keras builds the Dense
    on 320,000 inputs, while the widest width the config names is the Dense's own."""
    units = int(gibibytes * GiB) // (4 * 320_000)
    saved_and_edited(_flatten_model(), path, lambda config: _unbuilt_flatten_config(config, 40_000, 8, units))


def flattened_h5(path, gibibytes=3):
    """`flattened_unbuilt` as a legacy .h5 file, whose configs record no build_config."""
    _flatten_model().save(path)
    with h5py.File(path, "r+") as file:
        config = json.loads(file.attrs["model_config"])
        units = int(gibibytes * GiB) // (4 * 320_000)
        file.attrs["model_config"] = json.dumps(_unbuilt_flatten_config(config, 40_000, 8, units))


def huge_layer(make_layer, shape, dtype="float32", **change):
    """A maker: Sequential(Input(shape), make_layer()) with its layer config updated by `change`."""

    def edit(config):
        config["config"]["layers"][-1]["config"].update(change)
        return config

    return lambda path: saved_and_edited(keras.Sequential([keras.Input(shape, dtype=dtype), make_layer()]), path, edit)


def huge_conv2d(gibibytes=3):
    return huge_layer(lambda: keras.layers.Conv2D(2, 3), (8, 8, 3), filters=int(gibibytes * GiB) // (4 * 28))


def huge_embedding(gibibytes=3):
    return huge_layer(lambda: keras.layers.Embedding(10, 2), (3,), "int32", input_dim=int(gibibytes * GiB) // 8)


def lying_stored_size(path, gibibytes=3):
    """A huge first Dense, and a weights member claiming 4 MB stored and 3.5 GiB inflated:
    bytes the file does not hold, which used to count towards what the config may declare."""
    write_archive(path, widened_members(wide_first_dense(gibibytes)))
    relabel(path, "model.weights.h5", compress_size=4 * MiB, file_size=int(3.5 * GiB))


# ---------------------------------------------------------------- models: zip bombs


def weights_bomb(path, gibibytes=3):
    """The digits model with a model.weights.h5 inflating to `gibibytes` GiB of zeros."""
    members = [(name, content) for name, content in widened_members() if name != "model.weights.h5"]
    mebibytes = int(gibibytes * 1024)
    write_archive(path, members, [("model.weights.h5", deflated_repeats(b"", bytes(MiB), mebibytes),
                                   mebibytes * MiB)])


def config_bomb(path, gibibytes=2):
    """The digits model with a config.json inflating to `gibibytes` GiB (its JSON, then spaces)."""
    members = [(name, content) for name, content in widened_members() if name != "config.json"]
    config = dict(widened_members())["config.json"]
    mebibytes = int(gibibytes * 1024)
    write_archive(path, members, [("config.json", deflated_repeats(config, b" " * MiB, mebibytes),
                                   len(config) + mebibytes * MiB)])


def _hollow_first_dataset(file, gibibytes):
    """Replaces the first weight dataset of an open HDF5 file by one declaring `gibibytes`
    GiB that stores nothing (chunked, no chunk written: reading it gives fill values)."""
    names = []
    file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    del file[names[0]]
    file.create_dataset(names[0], shape=(int(gibibytes * GiB) // 4,), dtype="float32", chunks=(MiB,))


def hollow_weights(path, gibibytes=3):
    """The digits model whose model.weights.h5 (stored, 40 kB) declares a `gibibytes` GiB dataset."""
    members = dict(widened_members())
    weights = io.BytesIO(members["model.weights.h5"])
    with h5py.File(weights, "r+") as file:
        _hollow_first_dataset(file, gibibytes)
    write_archive(path, [(name, weights.getvalue() if name == "model.weights.h5" else content)
                         for name, content in members.items()])


def hollow_h5(path, gibibytes=3):
    """A legacy .h5 model whose first weight dataset declares `gibibytes` GiB and stores nothing."""
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]).save(path)
    with h5py.File(path, "r+") as file:
        _hollow_first_dataset(file["model_weights"], gibibytes)


# ---------------------------------------------------------------- data


def npy_header(shape, dtype="<f4"):
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": dtype, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def npz_bomb(path, gibibytes=3):
    """An .npz whose x (digits-shaped float32 rows) inflates to `gibibytes` GiB of zeros."""
    mebibytes = int(gibibytes * 1024)
    header = npy_header((mebibytes * MiB // 256, 64))
    write_archive(path, [], [("x.npy", deflated_repeats(header, bytes(MiB), mebibytes), len(header) + mebibytes * MiB)])


def npz_lying_header(path, rows=10**12):
    """An .npz whose stored x.npy declares `rows` rows of 64 floats and holds one."""
    write_archive(path, [("x.npy", npy_header((rows, 64)) + bytes(256))])


def npy_lying_header(path, rows=10**12):
    """A .npy declaring `rows` rows of 64 floats and holding one."""
    Path(path).write_bytes(npy_header((rows, 64)) + bytes(256))


def sparse_npy(path, gibibytes=3):
    """A valid .npy of `gibibytes` GiB of zero rows of 64 floats, as a sparse file (no disk
    used): too large to memory-map under a 4 GB address space."""
    header = npy_header((int(gibibytes * GiB) // 256, 64))
    with open(path, "wb") as stream:
        stream.write(header)
        stream.truncate(len(header) + int(gibibytes * GiB))


def fifo(path):
    """A FIFO at `path`."""
    os.mkfifo(path)


def device(path):
    """A character device node at `path` with /dev/null's numbers; only root can make one."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))


def unix_socket(path):
    """A Unix socket file at `path` (its server closed, the file stays)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()

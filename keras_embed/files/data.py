"""Calibration data: files, image folders, saved tf.data datasets, arrays, tf.data datasets,
iterables of batches and generator functions, bundled datasets.

Everything is checked against the model input before use and streamed in batches, so
memory does not grow with the number of samples: `.npy` files and the uncompressed
members of `.npz` files are memory-mapped (read from disk as batches need them), values
are checked and cast batch by batch, and a compressed `.npz` member is inflated into
memory only up to `INFLATE_LIMIT`.

A model of several inputs takes a dict {input name: array} (Keras' convention), in a file
an `.npz` keyed by the input names (and an optional y); every array is checked against its
input and all hold the same rows. Batches of such data are dicts of row slices.

Example:
    >>> x, y = load_data("calib.npz")                 # key x, optional y; else the first array
    >>> x, y = load_checked("calib.npz", model)        # two inputs: keys image, features (and y)
    >>> x, y = load_checked("photos/", model)          # an image folder: labels from its class sub-folders
    >>> x, y = load_checked("calib_ds/", model)        # a tf.data.Dataset.save folder, streamed
    >>> x, y = bundled_dataset("digits")               # scikit-learn's bundled copy, no download
    >>> for batch in batches(x, batch_size=256): ...
"""

import errno
import math
import zipfile
from pathlib import Path

import keras
import numpy as np

from keras_embed.files.archives import member_start
from keras_embed.files.images import ImageFolder, image_folder
from keras_embed.files.saved_dataset import SavedDataset, is_saved_dataset, open_saved_dataset
from keras_embed.errors import InputError

DATASETS = ("digits", "iris", "wine", "breast_cancer", "regression1d")
INFLATE_LIMIT = 256 * 2**20  # bytes a compressed .npz member may inflate to in memory
_PREFETCH = -1  # tf.data.AUTOTUNE, without importing TensorFlow here
_CHUNK_BYTES = 16 * 2**20  # data is read and checked in pieces of about this size
_NPY_MAGIC, _ZIP_MAGICS = b"\x93NUMPY", (b"PK\x03\x04", b"PK\x05\x06")  # what np.load looks for, too


class LazyCast:
    """An array (memory-mapped, typically) seen through a cast to `dtype`, and through a
    choice of its `rows` when given: every slice is read and cast on its own, so a pass over
    the rows holds one batch at a time.

    Example:
        >>> rows = LazyCast(np.load("x.npy", mmap_mode="r"), "float32")
        >>> rows[:256].dtype, len(rows), len(rows.subset(np.arange(0, 100000, 2)))
        (dtype('float32'), 100000, 50000)
    """

    def __init__(self, array, dtype, rows=None):
        self.array, self.dtype, self.rows = array, np.dtype(dtype), rows
        self.shape, self.ndim = (len(array) if rows is None else len(rows), *array.shape[1:]), array.ndim

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        return np.asarray(self.array[key if self.rows is None else self.rows[key]], dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):  # everything at once: for model.fit and the like
        return np.asarray(self.array if self.rows is None else self.array[self.rows], dtype=dtype or self.dtype)

    def subset(self, index):
        """The rows `index` (positions in this view), still lazy."""
        return LazyCast(self.array, self.dtype, np.arange(len(self))[index] if self.rows is None else self.rows[index])


def is_array(data):
    """Whether `data` is an array (numpy, memory-mapped, a `LazyCast` or an `images.ImageFolder`), not a dataset
    or an iterable of batches."""
    return isinstance(data, (np.ndarray, LazyCast, ImageFolder))


def is_arrays(data):
    """Whether `data` is an array or a non-empty dict of arrays (the inputs of a model of several inputs)."""
    return is_array(data) or (isinstance(data, dict) and bool(data) and all(map(is_array, data.values())))


def row_count(data):
    """Rows of an array, or of a dict of arrays (refused unless every array has the same rows).

    Example:
        >>> row_count({"image": np.zeros((8, 4, 4, 2)), "features": np.zeros((8, 3))})
        8
    """
    if not isinstance(data, dict):
        return len(data)
    rows = {name: len(values) for name, values in data.items()}
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{name}: {count}" for name, count in rows.items())
        raise InputError(f"data has unequal rows per input ({shown}); give every input the same rows")
    return next(iter(rows.values()), 0)


def spread_rows(data, limit):
    """At most `limit` rows of `data` (an array, a dict of arrays or labels), spread over all
    of it: every k-th row from the first, k = ceil(rows / limit), so a class-sorted image
    folder keeps every class; still lazy (a memory-mapped view, fewer image files).

    Example:
        >>> spread_rows(np.arange(10), 4)
        array([0, 3, 6, 9])
    """
    if limit is None or data is None:
        return data
    if isinstance(data, dict):
        return {name: spread_rows(values, limit) for name, values in data.items()}
    step = max(1, math.ceil(len(data) / limit))
    if isinstance(data, SavedDataset):
        return data.every(step)
    return row_subset(data, slice(None, None, step))


def take_rows(data, rows):
    """`data[rows]` of an array, or of every array of a dict, as plain numpy arrays."""
    if isinstance(data, dict):
        return {name: np.asarray(values[rows]) for name, values in data.items()}
    return np.asarray(data[rows])


def row_subset(data, rows):
    """The rows `rows` (a slice or index array) of an array or of every array of a dict,
    as lazy as the input: a memory-mapped array or `LazyCast` stays a view read batch by
    batch, an image folder keeps its files."""
    if isinstance(data, dict):
        return {name: row_subset(values, rows) for name, values in data.items()}
    if isinstance(data, LazyCast):
        return data.subset(rows)
    if isinstance(data, ImageFolder):
        return ImageFolder(np.asarray(data.files, dtype=object)[rows].tolist(), data.size, data.channels, data.dtype)
    if isinstance(data, np.memmap) and not isinstance(rows, slice):
        return LazyCast(data, data.dtype, np.arange(len(data))[rows])
    return data[rows]


def split_calibration(data, labels, share, seed=0):
    """Seeded split of the rows of `data` (an array or a dict of arrays; `row_subset`: as
    lazy as it is) and `labels`:
    ((data, labels) to fit on, (data, labels) held out: round(share * rows) rows, at least
    one), each in the original row order; None for the held-out part when `share` is 0 or
    fewer than two rows.

    Example:
        >>> (fit, _), (held, _) = split_calibration(np.arange(10), None, 0.2)
        >>> held
        array([4, 6])
    """
    rows = row_count(data)
    count = min(rows - 1, max(1, round(share * rows))) if share > 0 else 0
    if count < 1:
        return (data, labels), None
    order = np.random.default_rng(seed).permutation(rows)
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    pick = lambda values, index: None if values is None else row_subset(values, index)  # noqa: E731
    return (pick(data, kept), pick(labels, kept)), (pick(data, held), pick(labels, held))


def load_data(path, keyed=False):
    """Reads (x, y) from `.npy` (y is None) or `.npz` (key `x`, optional `y`; else the first
    array); with `keyed`, x is the dict of every `.npz` member but `y` (a model's inputs by name).

    Arrays stored uncompressed come back memory-mapped (read-only `np.memmap`s); a
    compressed `.npz` member is inflated into memory.

    Raises:
        InputError: missing or unreadable files, other extensions, archives without arrays,
            headers declaring more data than the file holds, compressed members inflating
            past `INFLATE_LIMIT`, arrays that cannot be memory-mapped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file '{path}' not found; check the path")
    if path.suffix not in (".npy", ".npz"):
        raise InputError(f"unknown data format '{path.suffix}' of '{path}'; pass a .npy or .npz file")
    try:
        with open(path, "rb") as stream:
            magic = stream.read(len(_NPY_MAGIC))
        if magic.startswith(_ZIP_MAGICS):
            return _load_npz(path, keyed)
        if magic != _NPY_MAGIC:
            raise ValueError("neither a .npy nor a .npz file")
        if keyed:
            raise InputError(f"data file '{path}' is one .npy array but the model takes several inputs; save an "
                             ".npz keyed by the input names: np.savez(path, name=array, ...)")
        return _mapped(path, 0, path.stat().st_size), None
    except InputError:
        raise
    except Exception as error:  # numpy, zipfile and the OS raise many types for damaged files
        raise InputError(f"could not read data file '{path}' ({error}); save it with np.save or np.savez") from None


def _npy_header(stream):
    """(shape, fortran_order, dtype) of the .npy data in `stream`, read up to its values."""
    major, _ = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("it holds Python objects, which only unpickling could read")
    return shape, fortran_order, dtype


def _check_declared(path, shape, dtype, available):
    declared = math.prod(shape) * dtype.itemsize
    if declared > available:
        raise InputError(f"data file '{path}' declares a {shape} {dtype} array ({declared} bytes) but holds only "
                         f"{max(available, 0)} bytes of it: it is truncated or tampered with; save it again with "
                         "np.save or np.savez")
    return declared


def _mapped(path, start, size):
    """The .npy array at bytes [start, start + size) of the file `path`, memory-mapped read-only."""
    with open(path, "rb") as stream:
        stream.seek(start)
        shape, fortran_order, dtype = _npy_header(stream)
        offset = stream.tell()
    declared = _check_declared(path, shape, dtype, start + size - offset)
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")
    except OSError as error:
        if error.errno != errno.ENOMEM:
            raise
        raise InputError(f"data file '{path}' holds {declared} bytes of inputs, which cannot be memory-mapped here "
                         "(out of address space: see ulimit -v); pass fewer rows") from None


def _load_npz(path, keyed=False):
    with zipfile.ZipFile(path) as archive:
        arrays = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
        if not arrays:
            raise InputError(f"data file '{path}' holds no arrays; save x with np.savez(path, x=x)")
        key = "x" if "x" in arrays else next((name for name in arrays if name != "y"), None)
        if key is None:  # labels alone (a damaged member name can hide x) are no inputs
            raise InputError(f"data file '{path}' holds labels y but no inputs; save x with np.savez(path, x=x, y=y)")
        y = _member_array(path, archive, arrays["y"]) if "y" in arrays and (keyed or key == "x") else None
        if keyed:
            return {key: _member_array(path, archive, info) for key, info in arrays.items() if key != "y"}, y
        return _member_array(path, archive, arrays[key]), y


def _member_array(path, archive, info):
    """The array of one .npz member: memory-mapped when stored, else inflated (bounded)."""
    if info.compress_type == zipfile.ZIP_STORED:
        with archive.open(info) as member:  # checks the local header and, read to the end, the CRC
            while member.read(_CHUNK_BYTES):
                pass
        return _mapped(path, member_start(path, info), min(info.file_size, info.compress_size))
    with archive.open(info) as member:
        shape, _, dtype = _npy_header(member)
        declared = _check_declared(path, shape, dtype, info.file_size - member.tell())
    if declared > INFLATE_LIMIT:
        raise InputError(f"data file '{path}' holds '{info.filename}' compressed, inflating to {declared} bytes, more "
                         f"than the {INFLATE_LIMIT} keras-embed inflates into memory; save it with np.savez or "
                         "np.save (uncompressed: read from disk as needed)")
    with archive.open(info) as member:  # zipfile stops at the member's declared size, then checks the CRC
        return np.lib.format.read_array(member, allow_pickle=False)


def load_array(path):
    """The inputs `x` of a `.npy` or `.npz` file (see `load_data`)."""
    return load_data(path)[0]


def load_checked(path, model):
    """(inputs checked against `model`, labels y checked against them, or None) of a data
    file (for a model of several inputs an `.npz` keyed by its input names, see
    `check_inputs`), or of an image folder (`images.image_folder`: labels from its class
    sub-folders), or of a folder written by `tf.data.Dataset.save` (`saved_dataset`)."""
    specs = input_specs(model)
    if Path(path).is_dir() and is_saved_dataset(path):
        x = open_saved_dataset(path, specs)
        return x, x.labels
    if Path(path).is_dir():
        if len(specs) > 1:
            raise InputError(f"'{path}' is an image folder but the model takes {len(specs)} inputs; pass an .npz "
                             "keyed by the input names")
        x, y = image_folder(path, specs[0])
        return check_inputs(x, model), y
    x, y = load_data(path, keyed=len(specs) > 1)
    x = check_inputs(x, model)
    return x, check_labels(y, x)


def bundled_dataset(name):
    """(x, y) of one of scikit-learn's bundled datasets, features scaled to [0, 1] (float32),
    or of `regression1d`, the width paper's kind of synthetic task (see `regression_1d`)."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if name == "regression1d":
        return regression_1d()
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    x = bunch.data.astype(np.float64)
    span = x.max(axis=0) - x.min(axis=0)
    x = (x - x.min(axis=0)) / np.where(span > 0, span, 1.0)
    return x.astype(np.float32), bunch.target.astype(np.int64)


def regression_1d(samples=50):
    """A 1-D regression task like the width paper's: `samples` points on [-1, 1] of a smooth
    target with two bumps; y has shape (samples, 1). Deterministic (float32).

    Example:
        >>> x, y = regression_1d()
        >>> x.shape, y.shape
        ((50, 1), (50, 1))
    """
    x = np.linspace(-1.0, 1.0, samples)[:, None]
    y = 0.6 * np.tanh(4.0 * x) + 0.3 * np.sin(3.0 * np.pi * x) * np.exp(-2.0 * x**2)
    return x.astype(np.float32), y.astype(np.float32)


def check_inputs(x, model):
    """Returns `x` as the model input dtype after checking shape and values.

    Values are checked and cast piece by piece: a memory-mapped `x` (from `load_data`)
    is never read whole, and comes back as it is when it has the model's dtype, else as a
    `LazyCast`. Any other array comes back cast (a copy unless it has the dtype already).
    A model of several inputs takes a dict {input name: array}, each array checked so,
    every one with the same rows; so may a model of one input (its array comes back).

    Args:
        x: an array of inputs, or a dict of them by input name.
        model: a Keras model, an input node of its graph (`graph.inputs[0]`) or all of them.

    Raises:
        InputError: empty data, non-numeric or non-finite values, a shape the model does not
            take, a dict whose keys are not the input names, unequal rows.

    Example:
        >>> check_inputs({"image": images, "features": features}, model)   # a dict back, cast
    """
    specs = input_specs(model)
    if len(specs) == 1 and not isinstance(x, dict):
        return _check_array(x, *specs[0][1:])
    names = [name for name, _, _ in specs]
    if not isinstance(x, dict):
        raise InputError(f"the model takes {len(names)} inputs ({', '.join(names)}) but the data is one "
                         f"{type(x).__name__}; pass a dict (an .npz) keyed by the input names")
    if set(x) != set(names):
        raise InputError(f"data has keys {sorted(map(str, x))} but the model's inputs are {names}; "
                         "give one array per input, keyed by its name")
    checked = {name: _check_array(x[name], shape, dtype, f"input '{name}'") for name, shape, dtype in specs}
    row_count(checked)
    return checked if len(specs) > 1 else checked[names[0]]


def _check_array(x, shape, dtype, label="data"):
    """One input array checked against (shape, dtype); see `check_inputs`."""
    source = x.array if isinstance(x, LazyCast) else x if isinstance(x, (np.memmap, ImageFolder)) else np.asarray(x)
    if source.ndim == 0 or len(source) == 0:
        raise InputError(f"{label} holds no samples; pass at least one input row")
    if not (np.issubdtype(source.dtype, np.integer) or np.issubdtype(source.dtype, np.floating)
            or source.dtype == bool):
        raise InputError(f"{label} has dtype {source.dtype}; pass real numeric inputs")
    if source.ndim != len(shape) + 1 or any(want not in (None, got) for want, got in zip(shape, source.shape[1:])):
        shown = ", ".join("n" if size is None else str(size) for size in (None, *shape))
        raise InputError(f"{label} has shape {source.shape} but the model takes ({shown}); pass inputs of that shape")
    if isinstance(source, ImageFolder):
        return source  # decoded pixels, finite, in the model's dtype: read once, when used
    if isinstance(source, np.memmap):
        checked = source if source.dtype == dtype else LazyCast(source, dtype)
    else:
        checked = source.astype(dtype, copy=False)
    rows = max(1, _CHUNK_BYTES // max(1, source[0].nbytes))
    if not all(np.all(np.isfinite(piece)) for piece in batches(checked, rows)):
        raise InputError(f"{label} holds NaN or infinite values (as {dtype}); clean it before calibrating")
    return checked


def check_labels(y, x):
    """Returns labels `y` (or None) after checking there is one per input row."""
    if y is None:
        return None
    y, rows = np.asarray(y), row_count(x)
    if y.ndim == 0 or len(y) != rows:
        raise InputError(f"data has {rows} inputs but {0 if y.ndim == 0 else len(y)} labels y; give one label per row")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)) or not np.all(np.isfinite(y)):
        raise InputError(f"labels y have dtype {y.dtype} or non-finite values; give numeric labels")
    return y


def input_specs(model):
    """[(name, shape without the batch axis, dtype)] of the inputs of a Keras model, of a
    graph input node, or of a list of them (`graph.inputs`).

    Example:
        >>> input_specs(model)
        [('image', (8, 8, 1), 'float32'), ('features', (5,), 'float32')]
    """
    if isinstance(model, keras.Model):
        return [(tensor.name, tuple(tensor.shape[1:]), keras.backend.standardize_dtype(tensor.dtype))
                for tensor in model.inputs]
    nodes = model if isinstance(model, (list, tuple)) else [model]
    return [(node.name, tuple(node.shape), node.dtype) for node in nodes]


def _first(element):
    """The inputs of a batch given as x, (x, y[, w]) or {'x': ...} (x may be a dict of inputs by name)."""
    if isinstance(element, dict):
        return element.get("x", next(iter(element.values())))
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def batches(data, batch_size=256):
    """Yields numpy batches of inputs from an array, a dict of arrays (by input name), a
    tf.data.Dataset, a `saved_dataset.SavedDataset`, an iterable of batches or a function
    returning one (a generator function: called once per pass).

    An array (numpy, memory-mapped or a `LazyCast`) is sliced into `batch_size` rows, a dict
    of arrays into dicts of such slices; a dataset or iterable is used batch by batch as it
    comes (elements may be x, (x, y) or {'x': x}, x an array or a dict of arrays by input
    name; a dict element without 'x' gives its first value).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1. Received: batch_size={batch_size}")
    if isinstance(data, (str, bytes)) or (isinstance(data, dict) and not is_arrays(data)):
        raise InputError(f"data of type {type(data).__name__}; pass an array, a dict of arrays by input name, "
                         "a tf.data.Dataset or an iterable of batches")
    if is_arrays(data):
        for start in range(0, row_count(data), batch_size):
            yield take_rows(data, slice(start, start + batch_size))  # plain arrays, even of memory-mapped ones
        return
    if isinstance(data, SavedDataset):
        data = data.dataset(batch_size)
    if callable(data):  # a generator function: a fresh iterator per pass
        data = data()
    if hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset: the next batches made while this one is used
        data = data.prefetch(_PREFETCH).as_numpy_iterator()
    for element in data:
        inputs = _first(element)
        yield {name: np.asarray(part) for name, part in inputs.items()} if isinstance(inputs, dict) else np.asarray(inputs)


def concatenated(parts):
    """One array (or dict of arrays by input name) of the batches `parts`, e.g. of `batches(dataset)`."""
    parts = list(parts)
    if parts and isinstance(parts[0], dict):
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return np.concatenate(parts)


def require_reusable(data):
    """Raises unless `data` can be read more than once (a generator cannot)."""
    if data is not None and not is_array(data) and not callable(data) and iter(data) is data:
        raise InputError(
            "calibration data is a one-shot iterator but is read twice (statistics, then verification); "
            "pass an array, a list of batches, a tf.data.Dataset or the generator function itself (called once "
            "per pass)"
        )


def sample_count(data):
    """Number of samples when known up front (arrays and dicts of them), else None."""
    return row_count(data) if is_arrays(data) else None

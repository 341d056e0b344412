"""Calibration data: files, arrays, tf.data datasets, iterables of batches, bundled datasets.

Everything is checked against the model input before use and streamed in batches, so
memory does not grow with the number of samples.

Example:
    >>> x, y = load_data("calib.npz")                 # key x, optional y; else the first array
    >>> x, y = bundled_dataset("digits")               # scikit-learn's bundled copy, no download
    >>> for batch in batches(x, batch_size=256): ...
"""

from pathlib import Path

import keras
import numpy as np

from keras_embed.errors import InputError

DATASETS = ("digits", "iris", "wine", "breast_cancer", "regression1d")


def load_data(path):
    """Reads (x, y) from `.npy` (y is None) or `.npz` (key `x`, optional `y`; else the first array).

    Raises:
        InputError: missing or unreadable files, other extensions, archives without arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file '{path}' not found; check the path")
    if path.suffix not in (".npy", ".npz"):
        raise InputError(f"unknown data format '{path.suffix}' of '{path}'; pass a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            if not loaded.files:
                raise InputError(f"data file '{path}' holds no arrays; save x with np.savez(path, x=x)")
            key = "x" if "x" in loaded.files else loaded.files[0]
            return loaded[key], (loaded["y"] if "y" in loaded.files and key == "x" else None)
    except InputError:
        raise
    except Exception as error:  # numpy, zipfile and tokenize raise many types for damaged files
        raise InputError(f"could not read data file '{path}' ({error}); save it with np.save or np.savez") from None


def load_array(path):
    """The inputs `x` of a `.npy` or `.npz` file (see `load_data`)."""
    return load_data(path)[0]


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

    Args:
        x: an array of inputs.
        model: a Keras model, or its input `InputSpec` (`graph.input`).

    Raises:
        InputError: empty data, non-numeric or non-finite values, or a shape the model
            does not take.
    """
    x = np.asarray(x)
    shape, dtype = _input_shape_and_dtype(model)
    if x.ndim == 0 or len(x) == 0:
        raise InputError("data holds no samples; pass at least one input row")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
        raise InputError(f"data has dtype {x.dtype}; pass real numeric inputs")
    if x.ndim != len(shape) + 1 or any(want not in (None, got) for want, got in zip(shape, x.shape[1:])):
        shown = ", ".join("n" if size is None else str(size) for size in (None, *shape))
        raise InputError(f"data has shape {x.shape} but the model takes ({shown}); pass inputs of that shape")
    cast = x.astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise InputError(f"data holds NaN or infinite values (as {dtype}); clean it before calibrating")
    return cast


def check_labels(y, x):
    """Returns labels `y` (or None) after checking there is one per input row."""
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != len(x):
        raise InputError(f"data has {len(x)} inputs but {0 if y.ndim == 0 else len(y)} labels y; give one label per row")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)) or not np.all(np.isfinite(y)):
        raise InputError(f"labels y have dtype {y.dtype} or non-finite values; give numeric labels")
    return y


def _input_shape_and_dtype(model):
    if isinstance(model, keras.Model):
        tensor = model.inputs[0]
        return tuple(tensor.shape[1:]), keras.backend.standardize_dtype(tensor.dtype)
    return tuple(model.shape), model.dtype


def _first(element):
    """The inputs of a batch given as x, (x, y[, w]) or {'x': ...}."""
    if isinstance(element, dict):
        return element.get("x", next(iter(element.values())))
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def batches(data, batch_size=256):
    """Yields numpy batches of inputs from an array, a tf.data.Dataset or an iterable of batches.

    An array is sliced into `batch_size` rows; a dataset or iterable is used batch by batch
    as it comes (elements may be x, (x, y) or {'x': x}).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1. Received: batch_size={batch_size}")
    if isinstance(data, (dict, str, bytes)):
        raise InputError(f"data of type {type(data).__name__}; pass an array, a tf.data.Dataset or an iterable of batches")
    if isinstance(data, np.ndarray):
        for start in range(0, len(data), batch_size):
            yield data[start:start + batch_size]
        return
    if hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset
        data = data.as_numpy_iterator()
    for element in data:
        yield np.asarray(_first(element))


def require_reusable(data):
    """Raises unless `data` can be read more than once (a generator cannot)."""
    if data is not None and not isinstance(data, np.ndarray) and iter(data) is data:
        raise InputError(
            "calibration data is a one-shot iterator but is read twice (statistics, then verification); "
            "pass an array, a list of batches or a tf.data.Dataset"
        )


def sample_count(data):
    """Number of samples when known up front (arrays), else None."""
    return len(data) if isinstance(data, np.ndarray) else None

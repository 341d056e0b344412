"""Calibration data from files, checked against the model input before use.

Example:
    >>> x = check_inputs(load_array("calib.npz"), model)
"""

from pathlib import Path

import keras
import numpy as np

from keras_embed.errors import InputError


def load_array(path):
    """Reads `x` from a `.npy` file or an `.npz` file (key `x`, else its first array).

    Raises:
        InputError: missing or unreadable files, other extensions.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file '{path}' not found; check the path")
    if path.suffix not in (".npy", ".npz"):
        raise InputError(f"unknown data format '{path.suffix}' of '{path}'; pass a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            if not loaded.files:
                raise InputError(f"data file '{path}' holds no arrays; save x with np.savez(path, x=x)")
            return loaded["x" if "x" in loaded.files else loaded.files[0]]
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"could not read data file '{path}' ({error}); save it with np.save or np.savez") from None


def check_inputs(x, model):
    """Returns `x` as the model input dtype after checking shape and values.

    Raises:
        InputError: empty data, non-numeric or non-finite values, or a shape the model
            does not take.
    """
    x = np.asarray(x)
    tensor = model.inputs[0]
    expected = tuple(tensor.shape[1:])
    if x.ndim == 0 or len(x) == 0:
        raise InputError("data holds no samples; pass at least one input row")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise InputError(f"data has dtype {x.dtype}; pass numeric inputs")
    if x.ndim != len(expected) + 1 or any(want not in (None, got) for want, got in zip(expected, x.shape[1:])):
        shown = ", ".join("n" if size is None else str(size) for size in (None, *expected))
        raise InputError(f"data has shape {x.shape} but the model takes ({shown}); pass inputs of that shape")
    if not np.all(np.isfinite(x)):
        raise InputError("data holds NaN or infinite values; clean it before calibrating")
    return x.astype(keras.backend.standardize_dtype(tensor.dtype))

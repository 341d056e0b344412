"""A dataset saved with `tf.data.Dataset.save` as calibration data, read from disk pass by pass.

Its elements may be x, (x, y), (x, y, sample weights), {'x': x, 'y': y} or, for a model of
several inputs, a dict of inputs by name (Keras' conventions for `model.fit`), batched or
not: an element's inputs with one axis more than the model input are batches. The folder
is opened with `tf.data.Dataset.load`, which reads the element structure from its
`dataset_spec.pb` and the values from its shards (nothing in the folder is executed).
Opening it reads it once: that pass counts the rows, keeps the labels y (one number per
row) and checks that every input value is finite; after it, every pass streams the
inputs in batches, so memory does not depend on the number of rows.

Example:
    >>> rows = open_saved_dataset("calib_ds/", input_specs(model))   # saved by ds.save("calib_ds/")
    >>> len(rows), rows.labels[:3]
    (100000, array([3, 0, 7]))
    >>> for batch in batches(rows): ...                               # numpy batches of 256 rows
"""

import copy
from pathlib import Path

import numpy as np

from keras_embed.errors import InputError

SPEC_FILE = "dataset_spec.pb"  # what Dataset.save writes next to its shards
_BATCH = 256  # rows per batch of a pass


def is_saved_dataset(path):
    """Whether the folder `path` holds a dataset written by `tf.data.Dataset.save`."""
    return (Path(path) / SPEC_FILE).is_file()


class SavedDataset:
    """The inputs of a saved dataset (every `step`-th row of it): iterable in batches, with
    `len` rows and the `labels` of those rows (None when the elements hold no y).

    Example:
        >>> rows = open_saved_dataset("calib_ds/", specs)
        >>> len(rows.every(10))    # every 10th row, still streamed
        10000
    """

    def __init__(self, path, specs, step=1):
        import tensorflow as tf

        self.path, self.specs, self.step = Path(path), specs, step
        saved = _load(path)
        self._parts = _parts(saved.element_spec, specs, path)
        labels, self.rows = _first_pass(self._elements())
        _check_complete(path, int(saved.cardinality()), self.rows, self._parts.batched)
        self.labels = labels if self._parts.has_labels else None

    def _elements(self):
        """(inputs, labels or 0) row by row, inputs cast to the model's dtypes."""
        import tensorflow as tf

        dataset = tf.data.Dataset.load(str(self.path))
        if self._parts.batched:
            dataset = dataset.unbatch()
        if self.step > 1:
            dataset = dataset.enumerate().filter(lambda index, _: index % self.step == 0).map(lambda _, row: row)
        return dataset.map(self._parts.split, num_parallel_calls=tf.data.AUTOTUNE)

    def every(self, step):
        """Every `step`-th row of these rows (`data.spread_rows`), without reading them again."""
        spread = copy.copy(self)
        spread.step, spread.rows = self.step * step, len(range(0, self.rows, step))
        spread.labels = None if self.labels is None else self.labels[::step]
        return spread

    def dataset(self, batch_size=_BATCH):
        """The inputs as a `tf.data.Dataset` of batches, each element (inputs,): inputs by name stay whole
        (`data.batches` reads a dict element without 'x' as one input's values)."""
        import tensorflow as tf

        return self._elements().map(lambda inputs, _: (inputs,)).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def __len__(self):
        return self.rows

    def __iter__(self):
        return (inputs for inputs, in self.dataset().as_numpy_iterator())

    def __getitem__(self, key):  # the first rows, e.g. the rows an export is checked on
        if not isinstance(key, slice) or key.start not in (None, 0) or key.step not in (None, 1):
            raise TypeError("a saved dataset gives its first rows only: rows[:n]")
        rows = self.rows if key.stop is None else min(key.stop, self.rows)
        return next(self.dataset(max(1, rows)).as_numpy_iterator())[0]

    def __array__(self, dtype=None, copy=None):  # every row at once: for model.fit and the like
        from keras_embed.files.data import concatenated

        arrays = concatenated(iter(self))
        return arrays if dtype is None or isinstance(arrays, dict) else np.asarray(arrays, dtype=dtype)


def open_saved_dataset(path, specs):
    """A `SavedDataset` of the folder `path` for a model's input `specs` (`data.input_specs`).

    Raises:
        InputError: a folder tf.data cannot load, elements whose inputs do not match the
            model's (names, shapes), an empty dataset, NaN or infinite inputs.
    """
    import tensorflow as tf

    try:
        return SavedDataset(path, specs)
    except tf.errors.OpError as error:  # a shard that cannot be read
        raise _unreadable(path, error.message) from None


def _load(path):
    """`tf.data.Dataset.load(path)`; a damaged spec or metadata file raises `InputError`."""
    import tensorflow as tf

    try:
        return tf.data.Dataset.load(str(path))
    except Exception as error:  # protobuf, tf.errors and ValueError, depending on which file is damaged
        raise _unreadable(path, getattr(error, "message", str(error))) from None


def _unreadable(path, message):
    """The one-line `InputError` of a saved dataset TensorFlow could not read, its reason without op names."""
    reason = message.splitlines()[0].split("}} ")[-1].split(" [Op:")[0] if message else "unknown reason"
    return InputError(f"could not read the saved dataset '{path}' ({reason}); save it again with tf.data.Dataset.save")


class _Parts:
    """How one saved element splits into the model's inputs and its labels."""

    def __init__(self, inputs_of, labels_of, batched, specs, is_tuple):
        self.inputs_of, self.labels_of, self.batched, self.specs = inputs_of, labels_of, batched, specs
        self.is_tuple = is_tuple  # tf.data maps a tuple element as one argument per part
        self.has_labels = labels_of is not None

    def split(self, *element):
        import tensorflow as tf

        element = element if self.is_tuple else element[0]
        inputs = self.inputs_of(element)
        if isinstance(inputs, dict):
            inputs = {name: tf.cast(inputs[name], dtype) for name, _, dtype in self.specs}
        else:
            inputs = tf.cast(inputs, self.specs[0][2])
        return inputs, self.labels_of(element) if self.has_labels else tf.zeros((), tf.int64)


def _parts(element_spec, specs, path):
    """The `_Parts` of `element_spec` (Keras' x / (x, y[, w]) / {'x', 'y'} / inputs by name)."""
    names = [name for name, _, _ in specs]
    if isinstance(element_spec, (tuple, list)):
        inputs_spec, inputs_of = element_spec[0], lambda element: element[0]
        labels_of = (lambda element: element[1]) if len(element_spec) > 1 else None
    elif isinstance(element_spec, dict) and "x" in element_spec:
        inputs_spec, inputs_of = element_spec["x"], lambda element: element["x"]
        labels_of = (lambda element: element["y"]) if "y" in element_spec else None
    else:
        inputs_spec, inputs_of, labels_of = element_spec, lambda element: element, None
    given = inputs_spec if isinstance(inputs_spec, dict) else {names[0]: inputs_spec} if len(names) == 1 else None
    if given is None or set(given) != set(names):
        shown = sorted(given) if given else type(inputs_spec).__name__
        raise InputError(f"the saved dataset '{path}' gives inputs {shown} but the model's inputs are {names}; "
                         "save elements (x, y) with x a dict keyed by the input names")
    batched = {_batch_axes(given[name], shape, name, path) for name, shape, _ in specs}
    if len(batched) > 1:
        raise InputError(f"the saved dataset '{path}' batches some inputs and not others; save them alike")
    if len(names) == 1 and isinstance(inputs_spec, dict):
        inputs_of = (lambda pick: lambda element: pick(element)[names[0]])(inputs_of)
    return _Parts(inputs_of, labels_of, batched.pop(), specs, isinstance(element_spec, (tuple, list)))


def _batch_axes(spec, shape, name, path):
    """Whether an input's saved tensors are batches (one axis more than the model input)."""
    saved = tuple(spec.shape)
    for batched in (False, True):
        rows = saved[1:] if batched else saved
        if len(rows) == len(shape) and all(None in (want, got) or want == got for want, got in zip(shape, rows)):
            return batched
    shown = ", ".join("n" if size is None else str(size) for size in (None, *shape))
    raise InputError(f"the saved dataset '{path}' holds input '{name}' of shape {saved} but the model takes ({shown}); "
                     "save inputs of that shape, one row or one batch per element")


def _first_pass(elements):
    """(labels of every row, row count) of `elements`, checking that the inputs are finite."""
    import tensorflow as tf

    def finite(inputs, labels):
        parts = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(part, tf.float64))) for part in parts]), labels

    labels, rows = [], 0
    for ok, batch in elements.batch(_BATCH).map(finite).as_numpy_iterator():
        if not ok:
            raise InputError("the saved dataset holds NaN or infinite inputs; clean it before calibrating")
        labels.append(batch)
        rows += len(batch)
    return (np.concatenate(labels) if labels else np.empty(0, np.int64)), rows


def _check_complete(path, elements, rows, batched):
    """Raises when fewer rows were read than the `elements` its metadata records (damaged
    shards read as empty; a batched element holds at least one row), or none."""
    if elements >= 0 and (rows < elements if batched else rows != elements):
        raise InputError(f"the saved dataset '{path}' is damaged: its metadata records {elements} elements but "
                         f"{rows} rows could be read; save it again with tf.data.Dataset.save")
    if rows == 0:
        raise InputError(f"the saved dataset '{path}' holds no rows; save at least one input row")

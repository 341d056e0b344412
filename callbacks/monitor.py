"""`EmbeddingMonitor`: sees training stall near a critical point embedded from a narrower
or shallower network, logs the redundancy every few epochs, and can act on it."""

import logging
import os

import keras
import numpy as np

from keras_embed.files.data import batches, check_inputs, concatenated, is_arrays, load_data, row_count, take_rows
from keras_embed.edit.escape import break_symmetry
from keras_embed.errors import check_number
from keras_embed.find.probe import probe_redundancy, probe_requests
from keras_embed.measure.statistics import check_gram_memory, tensors
from keras_embed.model.build import Prober, build_model, write_weights
from keras_embed.model.read import read_model
from keras_embed.verify import predict

ACTIONS = ("warn", "stop", "escape")
LOGGER = logging.getLogger("keras_embed.callbacks")


class EmbeddingMonitor(keras.callbacks.Callback):
    """Logs per-layer redundancy on a probe set and detects stalls on embedded manifolds.

    Every `every` epochs it adds to `logs` (so History, CSVLogger and TensorBoard record
    them) `embed/<layer>/effective_width`, `embed/<layer>/linear_fraction` and
    `embed/stalled`, per channel group (named after its first layer: a Dense chain's
    hidden layers, a CNN's convolutions, the layers an Add joins under one name). A stall
    is `monitor` improving by less than `min_delta` (relative) over `patience` epochs while
    some group is redundant; on the first one the action runs.

    Args:
        x: probe inputs: an array, a `.npy`/`.npz` path, or a dataset (for a model of
            several inputs a dict of arrays by input name, an `.npz` keyed so, or a dataset
            of such dicts); at most `max_samples` rows are used, fixed at `on_train_begin`.
        every: analyse every this many epochs.
        patience: epochs over which the improvement is measured.
        min_delta: relative improvement below which training counts as stalled.
        cos: activation vectors with at least this cosine count as duplicates.
        action: "warn" (one line on the "keras_embed.callbacks" logger), "stop" (`model.stop_training`), "escape" (perturb the
            duplicated channels, outputs kept within `escape_tolerance`, training goes on), or
            a callable `action(monitor, summary, epoch)`.
        monitor: the logged quantity to watch ("loss", "val_loss", ...).
        seed: seed of the probe subsample and of the escape perturbation.
        max_samples: largest probe set.
        escape_tolerance: largest relative output change an escape may cause.

    Raises (at `on_train_begin`, before the first epoch):
        ValueError: a probe set that does not fit the model.
        InputError: a group whose Gram matrix exceeds `statistics.GRAM_BUDGET`.

    Example:
        >>> history = model.fit(x, y, epochs=50, callbacks=[EmbeddingMonitor(x[:1000])])
        >>> history.history["embed/stalled"][-1], history.history["embed/hidden/effective_width"][-1]
        (1.0, 3.0)
    """

    def __init__(self, x, every=1, patience=5, min_delta=1e-3, cos=0.999, action="warn", monitor="loss", seed=0,
                 max_samples=2048, escape_tolerance=1e-2):
        super().__init__()
        if not isinstance(x, (str, os.PathLike, np.ndarray)) and not hasattr(x, "__iter__"):
            raise ValueError(f"x must be an array, a .npy/.npz path or a dataset of probe inputs. Received: x={x!r}")
        if (isinstance(x, np.ndarray) and x.size == 0) or (isinstance(x, (list, tuple)) and not x):
            raise ValueError(f"x must hold at least one probe input. Received: x={x!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer. Received: every={every}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer. Received: patience={patience}")
        check_number("min_delta", min_delta, low=0)
        check_number("cos", cos, 0, 1, low_open=True)
        if not callable(action) and action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS} or a callable. Received: action={action!r}")
        check_number("escape_tolerance", escape_tolerance, low=0)
        if not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer. Received: max_samples={max_samples}")
        self.x, self.every, self.patience, self.min_delta, self.cos = x, every, patience, min_delta, cos
        self.action, self.monitor, self.seed, self.max_samples = action, monitor, seed, max_samples
        self.escape_tolerance = escape_tolerance

    def on_train_begin(self, logs=None):
        self._probe_x = self._probe_inputs()
        self._history = []
        self._stalled = False
        self._missing_warned = False
        self._rng = np.random.default_rng(self.seed)
        graph = read_model(self.model)
        self._layers = graph.editable_groups()
        check_gram_memory({group: graph.group_width(group) for group in self._layers})  # before the first epoch
        self._probe = Prober(build_model(graph, outputs=tensors(probe_requests(graph))))
        self.summary = None

    def _probe_inputs(self):
        several = len(self.model.inputs) > 1  # then a dict of arrays by input name, an .npz keyed so
        data = load_data(self.x, keyed=several)[0] if isinstance(self.x, (str, os.PathLike)) else self.x
        try:
            rows = check_inputs(data if is_arrays(data) else concatenated(batches(data)), self.model)
        except ValueError as error:
            raise ValueError(f"EmbeddingMonitor probe set: {error}") from None
        count = row_count(rows)
        if count > self.max_samples:
            chosen = np.random.default_rng(self.seed).choice(count, self.max_samples, replace=False)
            rows = take_rows(rows, np.sort(chosen))
        return rows

    def on_epoch_end(self, epoch, logs=None):
        self._observe(logs, (epoch + 1) % self.every == 0, epoch, f"Epoch {epoch + 1}")

    def _observe(self, logs, analyse, count, when):
        """One check (an epoch here): records the monitored value, analyses when `analyse`,
        writes the figures into `logs` and acts on the first stall. Returns the stall flag."""
        logs = logs if logs is not None else {}
        if self.monitor in logs:
            self._history.append(float(logs[self.monitor]))
        elif not self._missing_warned:
            self._missing_warned = True
            LOGGER.warning(f"EmbeddingMonitor: '{self.monitor}' is not in the logs ({', '.join(sorted(logs))}); "
                           "stalls cannot be detected (for val_loss, pass validation data to fit)")
        stalled = False
        if analyse:
            graph = read_model(self.model)
            write_weights(self._probe.model, graph)
            self.summary = probe_redundancy(graph, self._probe_x, self.cos, probe=self._probe)
            stalled = self._plateau() and any(layer.redundant for layer in self.summary.values())
        self._log(logs, stalled)  # every epoch, so CSVLogger's columns and History's lists line up
        if stalled and not self._stalled:
            self._stalled = True
            self._act(count, when)
        return stalled

    def _log(self, logs, stalled):
        """The latest figures (NaN before the first analysis) and this epoch's stall flag."""
        for name in self._layers:
            layer = None if self.summary is None else self.summary[name]
            logs[f"embed/{name}/effective_width"] = float("nan") if layer is None else float(layer.effective_width)
            logs[f"embed/{name}/linear_fraction"] = float("nan") if layer is None else layer.linear_fraction
        logs["embed/stalled"] = float(stalled)

    def _plateau(self):
        if len(self._history) <= self.patience:
            return False
        before, recent = self._history[-self.patience - 1], min(self._history[-self.patience:])
        return (before - recent) < self.min_delta * max(abs(before), 1e-12)

    def describe(self):
        """One line saying what is redundant."""
        parts = [f"{name}: {layer.effective_width} of {layer.width} channels effective"
                 + (", linear on the probe set" if layer.linearized else "")
                 for name, layer in self.summary.items() if layer.redundant]
        return f"training stalled near an embedded critical point ({self.monitor} plateau); " + "; ".join(parts)

    def _act(self, count, when):
        if callable(self.action):
            self.action(self, self.summary, count)
        elif self.action == "stop":
            self.model.stop_training = True
            LOGGER.warning(f"{when}: {type(self).__name__} stops: {self.describe()}")
        elif self.action == "escape":
            LOGGER.warning(f"{when}: {type(self).__name__} "
                           f"{escape(self.model, self.summary, self._probe_x, self._rng, self.escape_tolerance)}: "
                           f"{self.describe()}")
        else:
            LOGGER.warning(f"{when}: {type(self).__name__}: {self.describe()}")


class BatchEmbeddingMonitor(EmbeddingMonitor):
    """The lighter `EmbeddingMonitor` for long epochs: the same checks, by the same code,
    every `every` training steps instead of epochs, on one probe batch (at most
    `max_samples` rows, default 256).

    The stall is judged on the batch-level `monitor` value, which Keras reports as the mean
    over the epoch so far, so it reacts later than the per-epoch monitor would. The
    figures go into the batch logs (TensorBoard with `update_freq`, a `LambdaCallback`)
    and, at each epoch end, the latest ones into the epoch logs (History, CSVLogger). With
    `steps_per_execution` above 1, Keras calls batch hooks once per execution: a check falls
    on the first call at or after each multiple of `every`. A callable action receives the
    step count.

    Example:
        >>> model.fit(x, y, epochs=3, callbacks=[BatchEmbeddingMonitor(x[:256], every=500)])
    """

    def __init__(self, x, every=100, max_samples=256, **kwargs):
        super().__init__(x, every=every, max_samples=max_samples, **kwargs)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._first_step = int(self.model.optimizer.iterations)
        self._checks, self._last_stalled = 0, False

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations) - self._first_step
        if step // self.every > self._checks:
            self._checks = step // self.every
            self._last_stalled = self._observe(logs, True, step, f"Step {step}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            self._log(logs, self._last_stalled)


def escape(model, summary, x, rng, tolerance, noise=1e-3, attempts=5):
    """Breaks the symmetry of the parallel channels of `summary` in place (`break_symmetry`),
    halving the noise until the outputs on `x` change by at most `tolerance` (relative).

    Returns:
        What happened, for the log: the sets perturbed, that there was nothing to perturb,
        or that no attempt stayed within the tolerance (the model is then as it was).
    """
    if not any(redundancy.groups for redundancy in summary.values()):
        return "found nothing to perturb (no duplicated channels)"
    graph = read_model(model, fold=False)
    original = model.get_weights()
    expected = predict(model, x)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
    for _ in range(attempts):
        moved, sets = break_symmetry(graph, summary, rng, noise)
        write_weights(model, moved)
        if np.abs(predict(model, x) - expected).max(initial=0.0) <= tolerance * scale:
            return f"perturbed {sets} set{'s' if sets != 1 else ''} of duplicated channels (noise {noise:.2g})"
        model.set_weights(original)
        noise /= 2
    return f"could not perturb the duplicated channels within escape_tolerance={tolerance:g}"

"""`EmbeddingMonitor`: sees training stall near a critical point embedded from a narrower
or shallower network, logs the redundancy every few epochs, and can act on it."""

import logging
import os

import keras
import numpy as np

from keras_embed.data import batches, check_inputs, load_array
from keras_embed.monitoring import layer_redundancy
from keras_embed.read import read_model
from keras_embed.stats import check_gram_memory
from keras_embed.verify import predict

ACTIONS = ("warn", "stop", "escape")
LOGGER = logging.getLogger("keras_embed.callbacks")


class EmbeddingMonitor(keras.callbacks.Callback):
    """Logs per-layer redundancy on a probe set and detects stalls on embedded manifolds.

    Every `every` epochs it adds to `logs` (so History, CSVLogger and TensorBoard record
    them) `embed/<layer>/effective_width`, `embed/<layer>/linear_fraction` and
    `embed/stalled`. A stall is `monitor` improving by less than `min_delta` (relative)
    over `patience` epochs while some layer is redundant; on the first one the action runs.

    Args:
        x: probe inputs: an array, a `.npy`/`.npz` path, or a dataset; at most
            `max_samples` rows are used, fixed at `on_train_begin`.
        every: analyse every this many epochs.
        patience: epochs over which the improvement is measured.
        min_delta: relative improvement below which training counts as stalled.
        cos: activation vectors with at least this cosine count as duplicates.
        action: "warn" (one line on the "keras_embed.callbacks" logger), "stop" (`model.stop_training`), "escape" (perturb the
            duplicated units, outputs kept within `escape_tolerance`, training goes on), or
            a callable `action(monitor, summary, epoch)`.
        monitor: the logged quantity to watch ("loss", "val_loss", ...).
        seed: seed of the probe subsample and of the escape perturbation.
        max_samples: largest probe set.
        escape_tolerance: largest relative output change an escape may cause.

    Raises (at `on_train_begin`, before the first epoch):
        ValueError: a probe set that does not fit the model.
        InputError: a hidden layer whose Gram matrices exceed `stats.GRAM_BUDGET`.

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
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer. Received: every={every}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer. Received: patience={patience}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be non-negative. Received: min_delta={min_delta}")
        if not 0 < cos <= 1:
            raise ValueError(f"cos must be in (0, 1]. Received: cos={cos}")
        if not callable(action) and action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS} or a callable. Received: action={action!r}")
        if not escape_tolerance >= 0:
            raise ValueError(f"escape_tolerance must be non-negative. Received: escape_tolerance={escape_tolerance}")
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
        hidden = read_model(self.model).layers[:-1]
        check_gram_memory(hidden)  # refused before the first epoch, not after it
        self._layers = [layer.name for layer in hidden]
        self.summary = None

    def _probe_inputs(self):
        data = load_array(self.x) if isinstance(self.x, (str, os.PathLike)) else self.x
        rows = data if isinstance(data, np.ndarray) else np.concatenate(list(batches(data)))
        try:
            rows = check_inputs(rows, self.model)
        except ValueError as error:
            raise ValueError(f"EmbeddingMonitor probe set: {error}") from None
        if len(rows) > self.max_samples:
            rows = rows[np.sort(np.random.default_rng(self.seed).choice(len(rows), self.max_samples, replace=False))]
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
            self.summary = layer_redundancy(read_model(self.model), self._probe_x, self.cos)
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
        parts = [f"{name}: {layer.effective_width} of {layer.width} units effective"
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
            changed = escape(self.model, self.summary, self._probe_x, self._rng, self.escape_tolerance)
            LOGGER.warning(
                f"{when}: {type(self).__name__} {'perturbed' if changed else 'could not perturb'} "
                f"the duplicated units: {self.describe()}"
            )
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
    """Breaks the symmetry of duplicated units in place: small noise on their incoming
    weights and a random re-split of their summed outgoing weights. Halves the noise until
    the outputs on `x` change by at most `tolerance` (relative); returns False, leaving
    the model as it was, when no attempt stays within it."""
    if any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        return False  # weights are read with BN folded in; writing them back would apply it twice
    original = model.get_weights()
    expected = predict(model, x)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
    names = list(summary)
    for _ in range(attempts):
        for index, name in enumerate(names):
            next_name = [layer.name for layer in read_model(model).layers][index + 1]
            _resplit(model.get_layer(name), model.get_layer(next_name), summary[name], rng, noise)
        if np.abs(predict(model, x) - expected).max(initial=0.0) <= tolerance * scale:
            return True
        model.set_weights(original)
        noise /= 2
    return False


def _resplit(layer, next_layer, redundancy, rng, noise):
    """Unit k of a group computes about scale_k times the first unit's activation, so the
    group's output is first * sum_k scale_k w_k; new shares of that sum keep it."""
    kernel, *bias = layer.get_weights()
    next_kernel, *next_bias = next_layer.get_weights()
    for group, scales in zip(redundancy.groups, redundancy.scales):
        scales = np.asarray(scales, dtype=next_kernel.dtype)[:, None]
        total = (scales * next_kernel[list(group)]).sum(axis=0)
        shares = rng.dirichlet(np.ones(len(group))).astype(next_kernel.dtype)[:, None]
        next_kernel[list(group)] = shares * total / scales
        spread = noise * (np.abs(kernel[:, list(group)]).max(initial=0.0) + 1e-12)
        kernel[:, list(group)] += rng.normal(0.0, spread, (kernel.shape[0], len(group))).astype(kernel.dtype)
    layer.set_weights([kernel, *bias])
    next_layer.set_weights([next_kernel, *next_bias])

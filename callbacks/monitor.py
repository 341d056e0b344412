"""`EmbeddingMonitor`: sees training stall at a saddle embedded from a narrower or shallower
network, tells it from convergence by the curvature of the loss, logs the redundancy, and can
act on it."""

import logging
import os

import keras
import numpy as np

from keras_embed.callbacks.plateau import Plateau
from keras_embed.files.data import batches, check_inputs, concatenated, is_arrays, load_data, row_count, take_rows
from keras_embed.edit.escape import break_symmetry
from keras_embed.errors import check_number
from keras_embed.find.probe import probe_redundancy, probe_requests
from keras_embed.measure.curvature import ProbeLoss, descend_along, probe_curvature
from keras_embed.measure.statistics import GRAM_BUDGET, check_gram_memory, tensors
from keras_embed.model.build import Prober, build_model, write_weights
from keras_embed.model.read import read_model
from keras_embed.verify import predict

ACTIONS = ("warn", "stop", "escape")
LOGGER = logging.getLogger("keras_embed.callbacks")
# A plateau is a saddle when the smallest Hessian eigenvalue estimate is below -NEGATIVE_CURVATURE times the
# largest, and converged whatever the curvature once the monitored loss is below CONVERGED_FRACTION of its first
# value. Both chosen on the width paper's 1-D runs (docs/condensation.md): on the tanh plateau the ratio is -8e-4
# to -2e-2 (Lanczos has converged by 20 steps there); at relu's minimum -1e-7; but once a fit is near zero loss
# Adam's spikes leave it where the residual term of the Hessian gives real negative curvature (-3e-3 of the
# largest at a loss 1e-4 of the first), with nothing left to gain.
NEGATIVE_CURVATURE = 5e-4
CONVERGED_FRACTION = 1e-3


class EmbeddingMonitor(keras.callbacks.Callback):
    """Detects stalls at saddles embedded from narrower networks, and logs the redundancy.

    When `monitor` stops improving (`patience` epochs, Keras' conventions: see
    `callbacks.plateau`), the monitor analyses the probe set: per channel group (named after
    its first layer: a Dense chain's hidden layers, a CNN's convolutions, the layers an Add
    joins under one name) the effective width and the share of channels in a linear regime,
    and, with probe targets `y`, the curvature of the training loss on a probe batch
    (`curvature_steps` Lanczos steps on Hessian-vector products). A plateau with redundancy
    and clearly negative curvature (smallest eigenvalue estimate below
    `-negative_curvature` times the largest) is `stalled` and the action runs; any other
    plateau is `converged` and nothing runs, as is a plateau of another quantity (say
    `val_loss`) while the training loss still falls, or one below `CONVERGED_FRACTION` of the
    first value. While stalled the check repeats every `patience` epochs; after a converged
    one the next comes as many epochs later again as the plateau has lasted. Without `y` the
    curvature cannot be measured and every redundant plateau counts as stalled (a warning
    says so at the start of fit).

    Every epoch `logs` gets (so History, CSVLogger and TensorBoard record them)
    `embed/stalled`, `embed/converged`, `embed/min_curvature` (smallest over largest
    eigenvalue estimate at the last check, NaN before), `embed/<group>/effective_width` and
    `embed/<group>/linear_fraction` (from the last analysis, NaN before).

    Args:
        x: probe inputs: an array, a `.npy`/`.npz` path (an `.npz` may hold `y`), or a
            dataset of x or (x, y) elements (for a model of several inputs a dict of arrays
            by input name, an `.npz` keyed so); at most `max_samples` rows are used,
            chosen (seeded) at `on_train_begin`.
        y: probe targets for the model's compiled loss (rows matching `x`).
        monitor, mode, min_delta, patience, baseline, start_from_epoch: the plateau test,
            as in `keras.callbacks.EarlyStopping` (`min_delta` relative to the best value).
        every: also analyse the redundancy every this many epochs (None: on plateaus only,
            the cheap default).
        cos: activation vectors with at least this cosine count as duplicates.
        action: "warn" (one line on the "keras_embed.callbacks" logger), "stop"
            (`model.stop_training`), "escape" (a step along the negative-curvature
            direction, the sign and length that lower the probe loss, outputs kept within
            `escape_tolerance`; without `y`, a random re-split of duplicated channels), or a
            callable `action(monitor, summary, epoch)`.
        negative_curvature: the saddle threshold (see `NEGATIVE_CURVATURE`).
        curvature_steps: Hessian-vector products per curvature check.
        curvature_samples: rows of the probe batch the curvature is measured on.
        seed: seed of the probe subsample, of Lanczos and of the re-split.
        max_samples: largest probe set.
        escape_tolerance: largest relative output change an escape may cause.
        gram_budget: bytes the Gram matrices of the analysis may take together.

    Raises (at `on_train_begin`, before the first epoch):
        ValueError: a probe set that does not fit the model, a subclassed model.
        InputError: Gram matrices above `gram_budget`.

    Example:
        >>> history = model.fit(x, y, epochs=50, callbacks=[EmbeddingMonitor(x[:1000], y[:1000])])
        >>> history.history["embed/stalled"][-1], history.history["embed/min_curvature"][-1]
        (1.0, -0.012)
    """

    def __init__(self, x, y=None, monitor="loss", mode="auto", min_delta=1e-3, patience=5, baseline=None,
                 start_from_epoch=0, every=None, cos=0.999, action="warn", negative_curvature=NEGATIVE_CURVATURE,
                 curvature_steps=20, curvature_samples=256, seed=0, max_samples=512, escape_tolerance=1e-2,
                 gram_budget=GRAM_BUDGET):
        super().__init__()
        if not isinstance(x, (str, os.PathLike, np.ndarray)) and not hasattr(x, "__iter__"):
            raise ValueError(f"x must be an array, a .npy/.npz path or a dataset of probe inputs. Received: x={x!r}")
        if (isinstance(x, np.ndarray) and x.size == 0) or (isinstance(x, (list, tuple)) and not x):
            raise ValueError(f"x must hold at least one probe input. Received: x={x!r}")
        for name, value in (("every", every), ("curvature_steps", curvature_steps),
                            ("curvature_samples", curvature_samples), ("max_samples", max_samples)):
            if (value is not None or name != "every") and (isinstance(value, bool) or not isinstance(value, int)
                                                          or value < 1):
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value}")
        check_number("cos", cos, 0, 1, low_open=True)
        check_number("negative_curvature", negative_curvature, low=0)
        check_number("escape_tolerance", escape_tolerance, low=0)
        if not callable(action) and action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS} or a callable. Received: action={action!r}")
        self.plateau = Plateau(monitor, mode, min_delta, patience, baseline, start_from_epoch)
        self.x, self.y, self.every, self.cos, self.action, self.seed = x, y, every, cos, action, seed
        self.monitor, self.patience, self.max_samples = monitor, patience, max_samples
        self.negative_curvature, self.curvature_steps = negative_curvature, curvature_steps
        self.curvature_samples, self.escape_tolerance = curvature_samples, escape_tolerance
        self.gram_budget = gram_budget

    def on_train_begin(self, logs=None):
        if not getattr(self.model, "inputs", None):
            raise ValueError(f"{type(self).__name__} reads Sequential and functional models; "
                             f"'{self.model.name}' is a subclassed model, whose connections live in Python code: "
                             "build it with keras.Sequential or the functional API")
        self._probe_x, self._probe_y = self._probe_rows()
        if self._probe_y is None:
            LOGGER.warning(f"{type(self).__name__}: no probe targets y, so the loss's curvature cannot be measured and "
                           "every redundant plateau counts as a stall; pass y to tell a saddle from a minimum")
        self.plateau.reset()
        self._training = Plateau("loss", "min", self.plateau.min_delta, self.patience)  # a saddle stalls it too
        self._loss = None if self._probe_y is None else ProbeLoss(self.model, *self._curvature_batch())
        self._missing_warned, self._first = False, None
        self._rng = np.random.default_rng(self.seed)
        graph = read_model(self.model)
        self._layers = graph.editable_groups()
        check_gram_memory({group: graph.group_width(group) for group in self._layers}, self.gram_budget)  # before fit
        self._probe = Prober(build_model(graph, outputs=tensors(probe_requests(graph))))
        self.summary, self.curvature, self.verdict = None, None, None

    def _probe_rows(self):
        """(inputs, targets or None) of the probe set: at most `max_samples` rows, seeded."""
        several = len(self.model.inputs) > 1  # then a dict of arrays by input name, an .npz keyed so
        data, y = load_data(self.x, keyed=several) if isinstance(self.x, (str, os.PathLike)) else (self.x, None)
        if not is_arrays(data):
            elements = list(data.as_numpy_iterator() if hasattr(data, "as_numpy_iterator") else data)
            pairs = [element for element in elements if isinstance(element, tuple) and len(element) > 1]
            y = concatenated([pair[1] for pair in pairs]) if pairs and len(pairs) == len(elements) else None
            data = concatenated(batches(elements))
        y = self.y if self.y is not None else y
        try:
            rows = check_inputs(data, self.model)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__} probe set: {error}") from None
        count = row_count(rows)
        targets = None if y is None else keras.tree.map_structure(np.asarray, y)  # one array per output
        if targets is not None and any(len(part) != count for part in keras.tree.flatten(targets)):
            raise ValueError(f"{type(self).__name__} probe set: {count} inputs but targets y of "
                             f"{[len(part) for part in keras.tree.flatten(targets)]} rows; give one target per probe row")
        if count > self.max_samples:
            chosen = np.sort(np.random.default_rng(self.seed).choice(count, self.max_samples, replace=False))
            rows, targets = take_rows(rows, chosen), _rows_of(targets, chosen)
        return rows, targets

    def on_epoch_end(self, epoch, logs=None):
        self._observe(logs, epoch, f"Epoch {epoch + 1}", epoch)

    def _observe(self, logs, epoch, when, count):
        """One check (an epoch here): takes the monitored value, analyses on a due plateau
        check (or every `every` epochs), writes the figures into `logs` and acts on a stall."""
        logs = logs if logs is not None else {}
        due = False
        if self.monitor in logs:
            value = float(logs[self.monitor])
            self._first = value if self._first is None else self._first
            due = self.plateau.update(value, epoch)
        elif not self._missing_warned:
            self._missing_warned = True
            LOGGER.warning(f"{type(self).__name__}: '{self.monitor}' is not in the logs ({', '.join(sorted(logs))}); "
                           "stalls cannot be detected (for val_loss, pass validation data to fit)")
        if "loss" in logs:
            self._training.update(float(logs["loss"]), epoch)
        if not self.plateau.on:
            self.verdict = None  # improving again: a later plateau is judged afresh
        if due and self.monitor != "loss" and not self._training.on:
            self.verdict = "converged"  # the training loss still falls: no saddle of it, nothing to analyse
        elif due:
            self._analyse(curvature=True)
            self._judge(value)
        if due and self.verdict == "converged":
            self.plateau.back_off()
        elif self.every is not None and (epoch + 1) % self.every == 0:
            self._analyse(curvature=False)
        self._log(logs)  # every epoch, so CSVLogger's columns and History's lists line up
        if due and self.verdict == "stalled":
            self._act(count, when)

    def _analyse(self, curvature):
        graph = read_model(self.model)
        write_weights(self._probe.model, graph)
        self.summary = probe_redundancy(graph, self._probe_x, self.cos, probe=self._probe)
        if curvature and self._probe_y is not None:
            self.curvature = probe_curvature(self._loss, self.curvature_steps, self.seed)

    def _curvature_batch(self):
        """(x, y): the first `curvature_samples` probe rows."""
        rows = slice(0, min(self.curvature_samples, row_count(self._probe_x)))
        return take_rows(self._probe_x, rows), _rows_of(self._probe_y, rows)

    def _judge(self, value):
        redundant = any(layer.redundant for layer in self.summary.values())
        saddle = self._probe_y is None or self.curvature.relative < -self.negative_curvature
        low = self.plateau.mode == "min" and abs(value) < CONVERGED_FRACTION * abs(self._first)
        self.verdict = "stalled" if redundant and saddle and not low else "converged"

    def _log(self, logs):
        """The latest figures (NaN before the first analysis) and this epoch's verdict."""
        for name in self._layers:
            layer = None if self.summary is None else self.summary[name]
            logs[f"embed/{name}/effective_width"] = float("nan") if layer is None else float(layer.effective_width)
            logs[f"embed/{name}/linear_fraction"] = float("nan") if layer is None else layer.linear_fraction
        logs["embed/stalled"] = float(self.verdict == "stalled")
        logs["embed/converged"] = float(self.verdict == "converged")
        logs["embed/min_curvature"] = float("nan") if self.curvature is None else self.curvature.relative

    def describe(self):
        """One line saying what is redundant and how the loss curves."""
        parts = [f"{name}: {layer.effective_width} of {layer.width} channels effective"
                 + (", linear on the probe set" if layer.linearized else "")
                 for name, layer in self.summary.items() if layer.redundant]
        curving = ("" if self.curvature is None else
                   f", smallest curvature {self.curvature.relative:.2g} of the largest")
        return f"training stalled at a saddle embedded from a narrower network ({self.monitor} plateau{curving}); " \
               + "; ".join(parts)

    def _act(self, count, when):
        if callable(self.action):
            self.action(self, self.summary, count)
        elif self.action == "stop":
            self.model.stop_training = True
            LOGGER.warning(f"{when}: {type(self).__name__} stops: {self.describe()}")
        elif self.action == "escape":
            LOGGER.warning(f"{when}: {type(self).__name__} {self._escape()}: {self.describe()}")
        else:
            LOGGER.warning(f"{when}: {type(self).__name__}: {self.describe()}")

    def _escape(self):
        """The escape step (see `action`); returns what it did, for the log."""
        if self.curvature is None:
            return "(no probe targets y, so no curvature: random re-split) " + escape(
                self.model, self.summary, self._probe_x, self._rng, self.escape_tolerance)
        step = descend_along(self._loss, self.curvature.direction, self.escape_tolerance)
        if step.length == 0.0:
            return (f"left the weights as they were: no step along the negative-curvature direction lowered the probe "
                    f"loss within escape_tolerance={self.escape_tolerance:g}")
        return (f"moved the weights by {step.length:.3g} ({step.length / max(step.norm, 1e-30):.2%} of their norm) "
                f"along the negative-curvature direction: probe loss {step.before:.4g} -> {step.after:.4g}")


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
        super().__init__(x, max_samples=max_samples, **kwargs)  # the plateau test counts checks, not epochs
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer. Received: every={every}")
        self.steps = every

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._first_step = int(self.model.optimizer.iterations)
        self._checks = 0

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations) - self._first_step
        if step // self.steps > self._checks:
            self._checks = step // self.steps
            self._observe(logs, self._checks - 1, f"Step {step}", step)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            self._log(logs)


def _rows_of(targets, rows):
    """The `rows` of every array in `targets` (an array, or a list or dict of them by output; None stays None)."""
    return None if targets is None else keras.tree.map_structure(lambda part: part[rows], targets)


def escape(model, summary, x, rng, tolerance, noise=1e-3, attempts=5):
    """Breaks the symmetry of the parallel channels of `summary` in place (`break_symmetry`),
    halving the noise until the outputs on `x` change by at most `tolerance` (relative).

    Returns:
        What happened, for the log: the sets perturbed, that there was nothing to perturb,
        or that no attempt stayed within the tolerance (the model is then as it was).
    """
    if not any(redundancy.groups for redundancy in summary.values()):
        return "found nothing to perturb: no duplicated channels (dead or constant ones are not moved)"
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

"""Stopping rules of approximate compression, and the figures they are judged on.

Exactly one rule bounds a `--mode data` compression: an accuracy drop (needs labels), a
relative output error, a keep ratio per layer, or a budget of parameters, of FLOPs per
sample or of milliseconds per call (`measure.latency`).

Example:
    >>> rule = StoppingRule("max_accuracy_drop", 0.5)            # percentage points
    >>> figures = measure(reference_outputs, outputs, y)
    >>> rule.holds(figures, params=1234)
    True
"""

import dataclasses
import math
import numbers

import numpy as np

from keras_embed.confidence import accuracy_drop_bound, output_error_bound, rows_to_certify
from keras_embed.errors import InputError

KINDS = ("max_accuracy_drop", "max_output_error", "keep_ratio", "target_params", "target_flops", "target_latency")


def relative_error(reference, outputs):
    """||outputs - reference||_F / ||reference||_F (0 when both are zero; inf when an
    output is NaN or infinite)."""
    norm = float(np.linalg.norm(reference))
    gap = float(np.linalg.norm(np.asarray(outputs) - reference))
    if not math.isfinite(gap):
        return math.inf
    return gap / norm if norm > 0 else gap


def predicted_classes(outputs):
    """Argmax over the last axis (a single output is thresholded at 0.5)."""
    outputs = np.asarray(outputs)
    return (outputs[..., 0] > 0.5).astype(np.int64) if outputs.shape[-1] == 1 else np.argmax(outputs, axis=-1)


def class_labels(y):
    """Integer class labels of `y`: integers (or one whole number per row) as they are,
    one-hot rows by their argmax; None for other targets (regression).

    Example:
        >>> class_labels(np.array([[0.0, 1.0], [1.0, 0.0]]))
        array([1, 0])
    """
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer) or (y.ndim == 1 and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        return y.reshape(len(y)).astype(np.int64)
    one_hot = y.ndim == 2 and y.shape[1] > 1 and np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)
    return np.argmax(y, axis=1) if one_hot else None


def check_reference(reference):
    """`reference` outputs as an array, after refusing NaN or infinite ones (InputError):
    the original model is then broken on these inputs, and nothing can be measured against it."""
    reference = np.asarray(reference)
    if not np.all(np.isfinite(reference)):
        raise InputError("the model's own outputs are NaN or infinite on the data it is checked on; "
                         "check the model's weights and the data")
    return reference


def measure(reference, outputs, y=None, classes=True, confidence=None):
    """Figures comparing `outputs` with `reference` outputs on the same inputs.

    A row of `outputs` holding NaN or infinity agrees with nothing and is never right, and
    makes the output error infinite, so no rule holds for it.

    Args:
        classes: whether the outputs are one classification output; without it (a model
            of several outputs, concatenated by `verify.output_rows`) only output_error.
        confidence: also the one-sided upper bounds at this level (`confidence` module).

    Returns:
        dict with output_error (relative), agreement (share of equal predicted classes),
        and, with class labels `y` (integers or one-hot), accuracy_before, accuracy_after
        and accuracy_drop (in percentage points); with `confidence`, also confidence, rows,
        output_error_bound and, with labels, losses, gains (rows newly wrong, newly right)
        and accuracy_drop_bound.

    Raises:
        InputError: `reference` holds NaN or infinity: the original model is broken on
            these inputs, and nothing can be measured against it.
    """
    reference, outputs = check_reference(reference), np.asarray(outputs)
    bounds = {} if confidence is None else _error_bound(reference, outputs, confidence)
    if not classes:
        return {"output_error": relative_error(reference, outputs), **bounds}
    before = predicted_classes(reference)
    after = np.where(np.isfinite(outputs).all(axis=-1), predicted_classes(outputs), -1)
    figures = {"output_error": relative_error(reference, outputs), "agreement": float(np.mean(before == after))}
    labels = None if y is None else class_labels(y)
    if labels is not None:
        labels = labels.reshape(before.shape)
        figures["accuracy_before"] = float(np.mean(before == labels))
        figures["accuracy_after"] = float(np.mean(after == labels))
        figures["accuracy_drop"] = 100.0 * (figures["accuracy_before"] - figures["accuracy_after"])
        if confidence is not None:
            losses = int(np.sum((before == labels) & (after != labels)))
            gains = int(np.sum((before != labels) & (after == labels)))
            bounds.update(losses=losses, gains=gains,
                          accuracy_drop_bound=accuracy_drop_bound(losses, gains, len(labels), confidence))
    return {**figures, **bounds}


def _error_bound(reference, outputs, confidence):
    """confidence, rows and output_error_bound of `outputs` against `reference` (rows first)."""
    rows = len(reference)
    reference, outputs = reference.reshape(rows, -1), outputs.reshape(rows, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        squared = np.sum((outputs.astype(np.float64) - reference) ** 2, axis=1)
    bound = output_error_bound(squared, float(np.mean(np.sum(reference.astype(np.float64) ** 2, axis=1))), confidence)
    return {"confidence": confidence, "rows": rows,
            "output_error_bound": bound if np.all(np.isfinite(squared)) else math.inf}


@dataclasses.dataclass(frozen=True)
class StoppingRule:
    """One stopping rule: `kind` (one of `KINDS`) and its bound; with `confidence`, an
    accuracy or output-error rule holds when the upper confidence bound of that figure on
    the held-out rows is within the bound (`confidence` module), not the point estimate.

    Example:
        >>> StoppingRule("max_accuracy_drop", 0.5, confidence=0.95).holds(measure(ref, out, y, confidence=0.95), 0)
        False
    """

    kind: str
    value: float
    confidence: float = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"unknown rule '{self.kind}'; choose one of {', '.join(KINDS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real) or not math.isfinite(self.value):
            raise InputError(f"--{self.kind.replace('_', '-')} must be a finite number. Received: {self.value!r}")
        if self.kind == "keep_ratio" and not 0 < self.value <= 1:
            raise InputError(f"--keep-ratio must be in (0, 1]. Received: {self.value}")
        if self.value < 0 or (self.kind == "target_params" and self.value < 1) or (
                self.kind in ("target_flops", "target_latency") and self.value <= 0):
            raise InputError(f"--{self.kind.replace('_', '-')} must be positive. Received: {self.value}")
        if self.confidence is not None and not (isinstance(self.confidence, numbers.Real)
                                                and 0 < self.confidence < 1):
            raise InputError(f"--confidence must be strictly between 0 and 1. Received: {self.confidence!r}")

    @property
    def needs_labels(self):
        return self.kind == "max_accuracy_drop"

    @property
    def bounded(self):
        """Whether the rule holds for a confidence bound (an accuracy or output-error rule with a confidence)."""
        return self.confidence is not None and self.kind in ("max_accuracy_drop", "max_output_error")

    def holds(self, figures, params):
        """Whether `figures` (from `measure`, with "flops" and "latency_ms" for those targets)
        and the parameter count meet the rule (never with NaN or infinite outputs)."""
        if not math.isfinite(figures["output_error"]):
            return False
        if self.kind == "max_accuracy_drop":
            return figures[self._figure("accuracy_drop")] <= self.value + 1e-9
        if self.kind == "max_output_error":
            return figures[self._figure("output_error")] <= self.value
        if self.kind == "target_params":
            return params <= self.value
        if self.kind == "target_flops":
            return figures["flops"] <= self.value
        if self.kind == "target_latency":
            return figures["latency_ms"] <= self.value
        return True

    def _figure(self, name):
        """The figure the rule compares: the point estimate, or with a confidence its bound."""
        return f"{name}_bound" if self.bounded else name

    def describe(self, figures, params):
        """The figure the rule is about, for messages (with a confidence, its bound and the
        rows that would certify the budget at the same shares of losses and gains)."""
        if self.kind == "max_accuracy_drop":
            return f"accuracy drop {figures['accuracy_drop']:.3g} pp{self._bound(figures, 'accuracy_drop', ' pp')} " \
                   f"(budget {self.value:g}){self._rows(figures)}"
        if self.kind == "max_output_error":
            return f"relative output error {figures['output_error']:.3g}{self._bound(figures, 'output_error', '')} " \
                   f"(budget {self.value:g})"
        if self.kind == "target_params":
            return f"{params} parameters (bound {int(self.value)})"
        if self.kind == "target_flops":
            return f"{figures['flops']:,} FLOPs per sample (target {int(self.value):,})"
        if self.kind == "target_latency":
            return f"a latency of {figures['latency_ms']:.3g} ms (target {self.value:g} ms)"
        return f"keep ratio {self.value:g}"

    def _bound(self, figures, name, unit):
        if not self.bounded:
            return ""
        return f", upper {self.confidence:.0%} confidence bound {figures[f'{name}_bound']:.3g}{unit} on {figures['rows']} rows"

    def _rows(self, figures):
        if not self.bounded or figures["accuracy_drop_bound"] <= self.value + 1e-9:
            return ""
        needed = self.rows_to_certify(figures)
        if needed is None:
            return "; no number of rows would certify it at these shares of losses and gains"
        return f"; about {needed:,} validation rows would certify {self.value:g} pp at these shares (--validation)"

    def rows_to_certify(self, figures):
        """Rows that would certify an accuracy budget at the measured shares (`confidence.rows_to_certify`),
        or None (no such count, or no accuracy rule with a confidence)."""
        if self.kind != "max_accuracy_drop" or not self.bounded or "losses" not in figures:
            return None
        return rows_to_certify(figures["losses"], figures["gains"], figures["rows"], self.value, self.confidence)


def shortfall(rule, figures, params):
    """What keeps `figures` (from `measure`) from passing: NaN or infinite outputs (under
    any rule, or none), else the figure of a `rule` that fails; None when they pass."""
    if not math.isfinite(figures["output_error"]):
        return "outputs that are NaN or infinite"
    if rule is not None and not rule.holds(figures, params):
        return rule.describe(figures, params)
    return None


def stopping_rule_from_options(**options):
    """The one `StoppingRule` among keyword options (None values ignored), with the option
    `confidence` (None: point estimates).

    Raises:
        InputError: when none or several are given.
    """
    confidence = options.pop("confidence", None)
    given = [StoppingRule(kind, float(value), confidence) for kind, value in options.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(f"--{kind.replace('_', '-')}" for kind in KINDS)
        raise InputError(f"--mode data needs exactly one stopping rule ({names}); got {len(given)}")
    return given[0]

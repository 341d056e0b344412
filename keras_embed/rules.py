"""Stopping rules of approximate compression, and the figures they are judged on.

Exactly one rule bounds a `--mode data` compression: an accuracy drop (needs labels), a
relative output error, a keep ratio per layer, or a parameter budget.

Example:
    >>> rule = Rule("max_accuracy_drop", 0.5)            # percentage points
    >>> figures = measure(reference_outputs, outputs, y)
    >>> rule.holds(figures, params=1234)
    True
"""

import dataclasses

import numpy as np

from keras_embed.errors import InputError

KINDS = ("max_accuracy_drop", "max_output_error", "keep_ratio", "target_params")


def relative_error(reference, outputs):
    """||outputs - reference||_F / ||reference||_F (0 when both are zero)."""
    norm = float(np.linalg.norm(reference))
    gap = float(np.linalg.norm(np.asarray(outputs) - reference))
    return gap / norm if norm > 0 else gap


def predicted_classes(outputs):
    """Argmax over the last axis (a single output is thresholded at 0.5)."""
    outputs = np.asarray(outputs)
    return (outputs[..., 0] > 0.5).astype(np.int64) if outputs.shape[-1] == 1 else np.argmax(outputs, axis=-1)


def measure(reference, outputs, y=None):
    """Figures comparing `outputs` with `reference` outputs on the same inputs.

    Returns:
        dict with output_error (relative), agreement (share of equal predicted classes),
        and, with labels `y`, accuracy_before, accuracy_after and accuracy_drop (in
        percentage points).
    """
    before, after = predicted_classes(reference), predicted_classes(outputs)
    figures = {"output_error": relative_error(reference, outputs), "agreement": float(np.mean(before == after))}
    if y is not None:
        labels = np.asarray(y).reshape(before.shape)
        figures["accuracy_before"] = float(np.mean(before == labels))
        figures["accuracy_after"] = float(np.mean(after == labels))
        figures["accuracy_drop"] = 100.0 * (figures["accuracy_before"] - figures["accuracy_after"])
    return figures


@dataclasses.dataclass(frozen=True)
class Rule:
    """One stopping rule: `kind` (one of `KINDS`) and its bound."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"unknown rule '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.kind == "keep_ratio" and not 0 < self.value <= 1:
            raise InputError(f"--keep-ratio must be in (0, 1]. Received: {self.value}")
        if self.value < 0 or (self.kind == "target_params" and self.value < 1):
            raise InputError(f"--{self.kind.replace('_', '-')} must be positive. Received: {self.value}")

    @property
    def needs_labels(self):
        return self.kind == "max_accuracy_drop"

    def holds(self, figures, params):
        """Whether `figures` (from `measure`) and the parameter count meet the rule."""
        if self.kind == "max_accuracy_drop":
            return figures["accuracy_drop"] <= self.value + 1e-9
        if self.kind == "max_output_error":
            return figures["output_error"] <= self.value
        if self.kind == "target_params":
            return params <= self.value
        return True

    def describe(self, figures, params):
        """The figure the rule is about, for messages."""
        if self.kind == "max_accuracy_drop":
            return f"accuracy drop {figures['accuracy_drop']:.3g} pp (bound {self.value:g})"
        if self.kind == "max_output_error":
            return f"relative output error {figures['output_error']:.3g} (bound {self.value:g})"
        if self.kind == "target_params":
            return f"{params} parameters (bound {int(self.value)})"
        return f"keep ratio {self.value:g}"


def rule_from_options(**options):
    """The one `Rule` among keyword options (None values ignored).

    Raises:
        InputError: when none or several are given.
    """
    given = [Rule(kind, float(value)) for kind, value in options.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(f"--{kind.replace('_', '-')}" for kind in KINDS)
        raise InputError(f"--mode data needs exactly one stopping rule ({names}); got {len(given)}")
    return given[0]

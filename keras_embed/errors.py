"""Errors keras-embed raises on purpose, each with the CLI exit code it maps to.

Every message is one line that names the problem and the fix, so the CLI can print it
as it is.

Example:
    >>> raise InputError("model file 'm.keras' not found; check the path")
"""

import math
import numbers


class KerasEmbedError(Exception):
    """Base class of every error keras-embed raises on purpose."""

    exit_code = 1


class InputError(KerasEmbedError, ValueError):
    """A file, array or argument cannot be used as given (exit code 2)."""

    exit_code = 2


class VerificationError(KerasEmbedError):
    """A rewritten model does not compute the outputs of the original (exit code 3).

    Args:
        max_abs_diff: largest absolute output difference seen.
        atol: the tolerance it exceeded.
    """

    exit_code = 3

    def __init__(self, max_abs_diff, atol):
        self.max_abs_diff = float(max_abs_diff)
        self.atol = float(atol)
        if math.isfinite(self.max_abs_diff):
            message = (f"outputs changed by up to {self.max_abs_diff:.3g}, above the tolerance {self.atol:.3g}; "
                       "nothing was written (raise --atol or pass --force to keep it)")
        else:  # no tolerance would pass it
            message = ("the rewritten model's outputs are NaN, infinite or of another shape where the original's are "
                       "finite; nothing was written (pass --force to keep it anyway)")
        super().__init__(message)


class UnsupportedLayerError(KerasEmbedError):
    """The model holds a layer or structure keras-embed cannot rewrite (exit code 4)."""

    exit_code = 4


class RuleError(KerasEmbedError):
    """An approximate compression breaks its stopping rule on held-out data (exit code 3)."""

    exit_code = 3


def check_number(name, value, low=None, high=None, low_open=False):
    """`value` as a float, after refusing anything but a finite real number in [low, high]
    (`low` itself excluded with `low_open`): a library argument check.

    Example:
        >>> check_number("rtol", float("nan"), low=0)
        ValueError: rtol must be a finite number >= 0. Received: rtol=nan
    """
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    below = low is not None and (number <= low if low_open else number < low)
    if math.isfinite(number) and not below and not (high is not None and number > high):
        return number
    bounds = ""
    if low is not None:
        bounds += f" {'>' if low_open else '>='} {low}"
    if high is not None:
        bounds += f"{' and' if bounds else ''} <= {high}"
    raise ValueError(f"{name} must be a finite number{bounds}. Received: {name}={value!r}")

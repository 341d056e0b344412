"""Errors keras-embed raises on purpose, each with the CLI exit code it maps to.

Every message is one line that names the problem and the fix, so the CLI can print it
as it is.

Example:
    >>> raise InputError("model file 'm.keras' not found; check the path")
"""


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
        super().__init__(
            f"outputs changed by up to {self.max_abs_diff:.3g}, above the tolerance "
            f"{self.atol:.3g}; nothing was written (raise --atol or pass --force to keep it)"
        )


class UnsupportedLayerError(KerasEmbedError):
    """The model holds a layer or structure keras-embed cannot rewrite (exit code 4)."""

    exit_code = 4


class RuleError(KerasEmbedError):
    """An approximate compression breaks its stopping rule on held-out data (exit code 3)."""

    exit_code = 3

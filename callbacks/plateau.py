"""When the monitored quantity has stopped improving, in Keras' own conventions.

`Plateau` follows `keras.callbacks.EarlyStopping`: `monitor`, `mode` ("auto" infers "max"
for accuracy-like names and "min" for losses and errors), `patience`, `baseline` (the value
to beat: until it is beaten every epoch counts as without improvement) and
`start_from_epoch` (epochs before it are ignored). One difference: `min_delta` is relative
to the best value, since losses span orders of magnitude.

Example:
    >>> plateau = Plateau("val_accuracy", patience=2)
    >>> [plateau.update(value, epoch) for epoch, value in enumerate([0.5, 0.6, 0.6, 0.6, 0.6, 0.6])]
    [False, False, False, True, False, True]
"""

import numpy as np

from keras_embed.errors import check_number

MODES = ("auto", "min", "max")
_RISING = ("acc", "auc", "precision", "recall", "f1", "iou")  # names Keras metrics that grow carry
_FALLING = ("loss", "error", "mse", "mae", "crossentropy")


def resolve_mode(monitor, mode):
    """"min" or "max" for `monitor` under `mode`.

    Raises:
        ValueError: "auto" on a name that says neither.
    """
    if mode != "auto":
        return mode
    name = monitor.lower()
    if any(part in name for part in _FALLING):
        return "min"
    if any(part in name for part in _RISING):
        return "max"
    raise ValueError(f"mode='auto' cannot tell whether '{monitor}' should rise or fall; pass mode='min' or "
                     f"mode='max'. Received: monitor={monitor!r}")


class Plateau:
    """Counts epochs without improvement of one monitored value.

    Args:
        monitor: the logged quantity ("loss", "val_accuracy", ...).
        mode: "auto", "min" or "max".
        min_delta: relative improvement over the best value below which an epoch does not count.
        patience: epochs without improvement that make a plateau.
        baseline: value to beat before anything counts as an improvement.
        start_from_epoch: epochs before this one are not looked at.
    """

    def __init__(self, monitor="loss", mode="auto", min_delta=1e-3, patience=5, baseline=None, start_from_epoch=0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer. Received: patience={patience}")
        if isinstance(start_from_epoch, bool) or not isinstance(start_from_epoch, int) or start_from_epoch < 0:
            raise ValueError(f"start_from_epoch must be a non-negative integer. Received: start_from_epoch={start_from_epoch}")
        check_number("min_delta", min_delta, low=0)
        if baseline is not None:
            check_number("baseline", baseline)
        self.monitor, self.min_delta, self.patience = monitor, min_delta, patience
        self.baseline, self.start_from_epoch = baseline, start_from_epoch
        self.mode = resolve_mode(monitor, mode)
        self.reset()

    def reset(self):
        """Forgets every value seen (at the start of a fit)."""
        worst = np.inf if self.mode == "min" else -np.inf
        self.best = worst if self.baseline is None else float(self.baseline)
        self.wait, self.next_check = 0, self.patience

    def improves(self, value):
        margin = self.min_delta * abs(self.best) if np.isfinite(self.best) else 0.0
        return value < self.best - margin if self.mode == "min" else value > self.best + margin

    def update(self, value, epoch):
        """Takes this epoch's value; True when a plateau check is due: after `patience`
        epochs without improvement, then every `patience` epochs (or as `back_off` sets)."""
        if epoch < self.start_from_epoch:
            return False
        if self.improves(value):
            self.best, self.wait, self.next_check = value, 0, self.patience
            return False
        self.wait += 1
        if self.wait < self.next_check:
            return False
        self.next_check = self.wait + self.patience
        return True

    def back_off(self):
        """Puts the next check as many epochs away as the plateau has lasted (instead of
        `patience`): checks that find nothing to do on a long plateau come at 1, 2, 4, ... times
        `patience`, a logarithmic number of them."""
        self.next_check = 2 * self.wait

    @property
    def on(self):
        """True while the epochs without improvement reach `patience`."""
        return self.wait >= self.patience

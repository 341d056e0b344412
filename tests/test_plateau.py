"""`callbacks.plateau.Plateau`: Keras' EarlyStopping conventions for "stopped improving"."""

import pytest

from keras_embed.callbacks.plateau import Plateau, resolve_mode


def checks(plateau, values):
    """Indices of the epochs at which a check is due."""
    return [epoch for epoch, value in enumerate(values) if plateau.update(value, epoch)]


@pytest.mark.parametrize("monitor, mode", [
    ("loss", "min"), ("val_loss", "min"), ("mae", "min"), ("val_mean_squared_error", "min"),
    ("accuracy", "max"), ("val_accuracy", "max"), ("val_sparse_categorical_accuracy", "max"), ("auc", "max"),
])
def test_auto_mode_follows_the_name(monitor, mode):
    assert resolve_mode(monitor, "auto") == mode


def test_auto_mode_refuses_a_name_that_says_nothing():
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        Plateau("widgets")


def test_a_falling_loss_is_never_a_plateau_and_a_flat_one_is_checked_every_patience_epochs():
    plateau = Plateau("loss", patience=3)
    assert checks(plateau, [1.0 / (epoch + 1) for epoch in range(20)]) == []
    plateau.reset()
    assert checks(plateau, [1.0] * 10) == [3, 6, 9]  # the first value is the best; then 3 epochs without


def test_rising_accuracy_is_improvement_and_min_delta_is_relative():
    plateau = Plateau("val_accuracy", patience=2, min_delta=0.01)
    assert checks(plateau, [0.5, 0.6, 0.7, 0.8, 0.9]) == []
    plateau.reset()
    assert checks(plateau, [0.5, 0.504, 0.503, 0.6]) == [2]  # +0.8% of 0.5 is below 1%


def test_baseline_counts_every_epoch_until_it_is_beaten():
    plateau = Plateau("loss", patience=2, baseline=0.5)
    assert checks(plateau, [0.9, 0.8, 0.7, 0.4, 0.3, 0.2]) == [1]


def test_start_from_epoch_ignores_the_first_epochs():
    plateau = Plateau("loss", patience=2, start_from_epoch=4)
    assert checks(plateau, [1.0] * 8) == [6]
    assert plateau.wait == 3


def test_back_off_doubles_the_wait_between_checks():
    plateau = Plateau("loss", patience=2)
    due = []
    for epoch in range(40):
        if plateau.update(1.0, epoch):
            due.append(epoch)
            plateau.back_off()
    assert due == [2, 4, 8, 16, 32]  # waits 2, 4, 8, 16, 32 epochs without improvement


def test_an_improvement_resets_the_wait_and_the_rhythm():
    plateau = Plateau("loss", patience=2)
    assert checks(plateau, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]) == [2, 5]
    assert plateau.best == 0.5


@pytest.mark.parametrize("name, value", [
    ("mode", "up"), ("patience", 0), ("patience", True), ("min_delta", -1.0), ("start_from_epoch", -1),
    ("baseline", float("nan")),
])
def test_invalid_arguments_raise_value_error(name, value):
    with pytest.raises(ValueError, match=f"Received: {name}="):
        Plateau("loss", **{name: value})

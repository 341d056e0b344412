"""The width paper's plateaus with `EmbeddingMonitor` watching (issue 18): a stall is a saddle.

The two tasks of `keras_embed.experiments.condensation` (seed 0). 1d: a 1-500-1 network from
a small start, full-batch Adam; the tanh network sits on the best linear fit (a width-1
critical point embedded in the wide network: a saddle) from about epoch 8 to 100, then the
loss falls; relu, on the same data, has no plateau and converges. digits: a 64-200-10 relu
network sits at the class frequencies (the width-0 critical point) from about epoch 25 to
110, every unit still near zero, then its units grow.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from keras_embed.experiments.condensation import TASKS, digits_task, linear_fit_loss, mean_fit_loss, plateau_task, run
from keras_embed.tools.cli import main
from keras_embed.tools.condensation import TASK_NAMES

PATIENCE = 5  # the monitor's default


@pytest.fixture(scope="module")
def tanh_run():
    return run("tanh", "warn", seed=0, every=None)


@pytest.fixture(scope="module")
def relu_run():
    return run("relu", "warn", seed=0, every=None)


@pytest.fixture(scope="module")
def digits_run():
    return run("relu", "warn", seed=0, epochs=200, every=None, task="digits")


def flat(loss):
    """Epochs whose loss is not 1e-3 below the best of `PATIENCE` epochs before (the monitor's plateau test,
    at its defaults): the loss may sit near the plateau's value while it starts to fall, and that is no stall."""
    return [epoch for epoch in range(PATIENCE, len(loss)) if loss[epoch] > (1 - 1e-3) * min(loss[:epoch - PATIENCE + 1])]


def falling(loss):
    """Epochs whose loss is 1e-2 below the best of `PATIENCE` epochs before: falling by ten times the monitor's
    `min_delta` (against the best, since Adam's loss oscillates)."""
    return [epoch for epoch in range(PATIENCE, len(loss)) if loss[epoch] < (1 - 1e-2) * min(loss[:epoch - PATIENCE + 1])]


@pytest.mark.parametrize("records, plateau", [("tanh_run", linear_fit_loss(*plateau_task())),
                                               ("digits_run", mean_fit_loss(*digits_task()))],
                         ids=["1d tanh", "digits relu"])
def test_stalled_on_the_plateau_and_off_while_the_loss_falls(records, plateau, request):
    records = request.getfixturevalue(records)
    loss, stalled = np.array(records["loss"]), np.array(records["stalled"])
    on_plateau = [epoch for epoch in flat(loss) if abs(loss[epoch] - plateau) < 1e-2 * plateau]
    first_left = next(epoch for epoch in range(len(loss)) if loss[epoch] < 0.9 * plateau)
    on_plateau = [epoch for epoch in on_plateau if epoch < first_left]
    assert len(on_plateau) > 40, on_plateau  # the run has the plateau this test is about
    assert stalled[on_plateau].mean() > 0.8, stalled[on_plateau]
    assert falling(loss) and stalled[falling(loss)].sum() == 0, [epoch for epoch in falling(loss) if stalled[epoch]]
    assert np.nanmax(np.array(records["min_curvature"])[on_plateau]) < 0  # negative curvature there


def test_relu_never_stalls_and_is_called_converged(relu_run):
    records = relu_run
    loss = records["loss"]
    assert loss[-1] < 1e-3 * loss[0]  # it converges
    assert sum(records["stalled"]) == 0
    assert sum(records["converged"][-200:]) > 0  # its plateaus after convergence are judged converged


def test_the_experiment_writes_its_table_and_files(tmp_path):
    folder = tmp_path / "condensation"
    result = CliRunner().invoke(main, ["experiment", "condensation", "-o", str(folder), "--seeds", "1",
                                       "--epochs", "12"], prog_name="keras-embed")
    assert result.exit_code == 0, result.output
    assert "| 1d | tanh 1-500-1 | escape |" in result.output and "| digits | relu 64-200-10 | warn |" in result.output
    assert sorted(path.name for path in folder.iterdir()) == ["curves.csv", "loss.png", "results.json", "summary.md"]
    document = json.loads((folder / "results.json").read_text())
    assert {(run_["task"], run_["activation"], run_["action"]) for run_ in document["runs"]} == {
        (task, activation, action) for task in TASKS for activation in TASKS[task].activations
        for action in ("warn", "escape")}
    assert len((folder / "curves.csv").read_text().splitlines()) == 1 + 6 * 12
    again = CliRunner().invoke(main, ["experiment", "condensation", "-o", str(folder), "--seeds", "1",
                                      "--epochs", "12"], prog_name="keras-embed")
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_the_cli_names_every_task():
    assert TASK_NAMES == tuple(TASKS)

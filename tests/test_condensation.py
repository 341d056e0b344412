"""The width paper's plateau with `EmbeddingMonitor` watching (issue 18): a stall is a saddle.

A 1-500-1 network from a small start, full-batch Adam on the 1-D task of
`keras_embed.experiments.condensation` (seed 0). The tanh network sits on the best linear fit
(a width-1 critical point embedded in the wide network: a saddle) from about epoch 8 to 100,
then the loss falls; relu, on the same data, has no plateau and converges.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from keras_embed.experiments.condensation import linear_fit_loss, plateau_task, run
from keras_embed.tools.cli import main

PATIENCE = 5  # the monitor's default


@pytest.fixture(scope="module")
def tanh_run():
    return run("tanh", "warn", seed=0, every=None)


@pytest.fixture(scope="module")
def relu_run():
    return run("relu", "warn", seed=0, every=None)


def falling(loss):
    """Epochs whose loss is below 0.9 of the loss `PATIENCE` epochs before."""
    return [epoch for epoch in range(PATIENCE, len(loss)) if loss[epoch] < 0.9 * loss[epoch - PATIENCE]]


def test_stalled_on_the_tanh_plateau_and_off_while_the_loss_falls(tanh_run):
    records = tanh_run
    loss, stalled = np.array(records["loss"]), np.array(records["stalled"])
    plateau = linear_fit_loss(*plateau_task())
    on_plateau = [epoch for epoch in range(2 * PATIENCE, len(loss)) if abs(loss[epoch] - plateau) < 1e-2 * plateau]
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
    assert "| tanh 1-500-1 | escape |" in result.output
    assert sorted(path.name for path in folder.iterdir()) == ["curves.csv", "loss.png", "results.json", "summary.md"]
    document = json.loads((folder / "results.json").read_text())
    assert {(run_["activation"], run_["action"]) for run_ in document["runs"]} == {
        (activation, action) for activation in ("tanh", "relu") for action in ("warn", "escape")}
    assert len((folder / "curves.csv").read_text().splitlines()) == 1 + 4 * 12
    again = CliRunner().invoke(main, ["experiment", "condensation", "-o", str(folder), "--seeds", "1",
                                      "--epochs", "12"], prog_name="keras-embed")
    assert again.exit_code == 2 and "--overwrite" in again.output

"""The width paper's Fig. 3: a critical point split into a wider network, and its Hessian.

Theorem 1 of the width paper: splitting a neuron keeps a critical point critical.
Theorem 2: every split adds a zero Hessian eigenvalue. Theorem 6.2 of the long version:
no count of negative, zero or positive eigenvalues ever drops, so a local minimum of the
narrow network can become a strict saddle of the wider one. Here, for each `Setup`, a
width-2 network is brought to a critical point (float64, full batch, gradient norm
below 1e-8), one hidden neuron is split equally into 2 and 3 copies with `widen`
(same incoming weights, outgoing weights 1/k each), and the full Hessian spectrum of
every network is computed with `keras_embed.hessian`.

Training differs by network because their landscapes do. The tanh network on the 1-D
task is minimized by trust-region Newton (scipy's `trust-exact`, exact Hessians) from a
standard-normal start; from half of the seeds 0-7 that ends at the same finite minimum
(seed 7 is the quickest), from the others the loss keeps decreasing towards a critical
point at infinity (a unit in its linear regime with vanishing input and diverging output
weights), which cannot be reached. The sigmoid networks on Iris are trained as in the
paper, full-batch Adam from a small start, into the slowly decaying stretch of the loss;
the critical point there is then solved for by Levenberg-Marquardt on the gradient (the
Hessian as Jacobian), a saddle; minimizing instead drives the sigmoids into saturation,
again towards infinity. The paper does not say how Iris' classes are encoded, so both
encodings run: one-hot (3 outputs) and the class index as one number (1 output).

Example:
    >>> result = strict_saddle(SETUPS[:1])
    >>> [(row["width"], row["negative"], row["zero"]) for row in result["rows"]]
    [(2, 0, 0), (3, 1, 1), (4, 2, 2)]
    >>> result["pattern_held"]
    True
"""

import dataclasses
import time

import keras
import numpy as np

from keras_embed.files.data import bundled_dataset
from keras_embed.edit.operators import widen
from keras_embed.errors import InputError
from keras_embed.hessian import ZERO_RTOL, EmpiricalRisk, eigenvalue_counts
from keras_embed.model.build import build_model
from keras_embed.model.read import read_model

CRITICAL_GRADIENT = 1e-8
COPIES = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One width-2 network of the experiment and how it reaches a critical point.

    Args:
        name: label in the table.
        dataset: a bundled dataset; the loss is MSE.
        activation: of the hidden layer.
        init_std: standard deviation of the Gaussian initial weights and biases.
        seed: seeds the initial weights.
        solver: "minimize" (trust-region Newton to a minimum) or "root"
            (Levenberg-Marquardt on the gradient, to the nearest critical point of any kind).
        adam_steps: full-batch Adam steps before the solver.
        learning_rate: of Adam.
        unit: the hidden neuron that is split.
        one_hot: class labels become one-hot targets (else one number per sample).
    """

    name: str
    dataset: str
    activation: str
    init_std: float
    seed: int
    solver: str
    adam_steps: int = 0
    learning_rate: float = 0.0
    unit: int = 0
    one_hot: bool = True


SETUPS = (
    Setup("tanh 1-D", "regression1d", "tanh", init_std=1.0, seed=7, solver="minimize"),
    # The paper's Iris setting: sigmoid, MSE, full-batch Adam lr 0.02, initial variance 1/m^6 (m = 2).
    Setup("sigmoid Iris one-hot", "iris", "sigmoid", init_std=2.0**-3, seed=0, solver="root", adam_steps=500,
          learning_rate=0.02),
    Setup("sigmoid Iris class index", "iris", "sigmoid", init_std=2.0**-3, seed=0, solver="root", adam_steps=500,
          learning_rate=0.02, one_hot=False),
)


def regression_targets(dataset, one_hot=True):
    """(x, y) in float64 for MSE: class labels become one-hot rows (or stay one number)."""
    x, y = bundled_dataset(dataset)
    if one_hot and np.issubdtype(y.dtype, np.integer):
        y = np.eye(int(y.max()) + 1)[y]
    return x.astype(np.float64), y.reshape(len(y), -1).astype(np.float64)


def width_two_network(setup, inputs, outputs):
    """Dense(2, activation) -> Dense(outputs), float64, Gaussian weights and biases."""

    def gaussian(offset):
        return keras.initializers.RandomNormal(stddev=setup.init_std, seed=setup.seed * 4 + offset)

    def dense(units, activation, name, offset):
        return keras.layers.Dense(units, activation=activation, name=name, dtype="float64",
                                  kernel_initializer=gaussian(offset), bias_initializer=gaussian(offset + 1))

    return keras.Sequential([
        keras.Input((inputs,), dtype="float64"),
        dense(2, setup.activation, "hidden", 0),
        dense(outputs, None, "output", 2),
    ], name=setup.name.replace(" ", "_").replace("-", ""))


def adam(risk, steps, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Full-batch Adam on the flat weights (Keras' defaults); leaves the result in the model."""
    theta = risk.parameters()
    first, second = np.zeros_like(theta), np.zeros_like(theta)
    for step in range(1, steps + 1):
        gradient = risk.value_and_gradient(theta)[1]
        first = beta_1 * first + (1 - beta_1) * gradient
        second = beta_2 * second + (1 - beta_2) * gradient**2
        rate = learning_rate * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
        theta = theta - rate * first / (np.sqrt(second) + epsilon)
    risk.set_parameters(theta)


def solve_critical_point(risk, solver, max_iterations=500):
    """Newton-type solve from the model's weights; leaves the result in the model.

    "minimize": scipy's trust-exact (a minimum); "root": Levenberg-Marquardt on the
    gradient with the Hessian as Jacobian (the nearest critical point, saddles included).
    """
    import scipy.optimize

    start = risk.parameters()
    if solver == "minimize":
        solution = scipy.optimize.minimize(risk.value_and_gradient, start, jac=True, hess=risk.hessian,
                                           method="trust-exact", options={"gtol": 1e-13, "maxiter": max_iterations})
    elif solver == "root":
        solution = scipy.optimize.root(lambda theta: risk.value_and_gradient(theta)[1], start, jac=risk.hessian,
                                       method="lm", options={"xtol": 1e-15, "ftol": 1e-15, "maxiter": max_iterations})
    else:
        raise InputError(f"unknown solver '{solver}'; use minimize or root")
    risk.set_parameters(solution.x)


def split_equally(model, unit, copies):
    """`model` with hidden `unit` split into `copies` units of equal outgoing weights."""
    graph = read_model(model)
    for remaining in range(copies, 1, -1):  # alpha 1/k, then 1/(k-1), ...: k equal shares
        graph = widen(graph, "hidden", unit, alpha=1.0 / remaining)
    return build_model(graph)


def spectrum_row(setup, model, x, y, rtol):
    """Width, loss, gradient norm, eigenvalues and their counts for one network."""
    risk = EmpiricalRisk(model, x, y, "mse")
    loss, gradient = risk.value_and_gradient()
    eigenvalues = np.linalg.eigvalsh(risk.hessian())
    return {
        "network": setup.name, "width": model.get_layer("hidden").units, "params": risk.size,
        "loss": float(loss), "grad_norm": float(np.linalg.norm(gradient)),
        **eigenvalue_counts(eigenvalues, rtol), "eigenvalues": eigenvalues.tolist(),
    }


def pattern(rows):
    """Per network: whether every point is critical, the change of the zero count at each
    split, the negative counts, and the expected pattern (one more zero eigenvalue per
    split, as in the paper's figure; Theorem 2 promises at least one; the negative count
    never decreasing)."""
    checks = {}
    for name in dict.fromkeys(row["network"] for row in rows):
        mine = [row for row in rows if row["network"] == name]
        zero_steps = [after["zero"] - before["zero"] for before, after in zip(mine, mine[1:])]
        negatives = [row["negative"] for row in mine]
        check = {
            "critical": all(row["grad_norm"] < CRITICAL_GRADIENT for row in mine),
            "zero_steps": zero_steps,
            "negative_counts": negatives,
            "zero_plus_one_per_split": all(step == 1 for step in zero_steps),
            "zero_grows_per_split": all(step >= 1 for step in zero_steps),
            "negative_never_decreasing": all(after >= before for before, after in zip(negatives, negatives[1:])),
        }
        check["expected_pattern"] = check["critical"] and check["zero_plus_one_per_split"] and check["negative_never_decreasing"]
        checks[name] = check
    return checks


def strict_saddle(setups=SETUPS, copies=COPIES, rtol=ZERO_RTOL):
    """Runs the experiment.

    Args:
        setups: the networks (`SETUPS`: the paper's tanh and Iris networks).
        copies: into how many equal copies the neuron is split (1: the network itself).
        rtol: zero threshold relative to the largest |eigenvalue| of each network.

    Returns:
        A JSON-ready dict: rows (network, width, params, loss, grad_norm, negative, zero,
        positive, zero_threshold, eigenvalues), setups, checks (see `pattern`),
        pattern_held (the expected pattern in every network), rtol, critical_gradient,
        seconds.
    """
    start = time.perf_counter()
    rows = []
    for setup in setups:
        x, y = regression_targets(setup.dataset, setup.one_hot)
        model = width_two_network(setup, x.shape[1], y.shape[1])
        risk = EmpiricalRisk(model, x, y, "mse")
        adam(risk, setup.adam_steps, setup.learning_rate)
        solve_critical_point(risk, setup.solver)
        rows.extend(spectrum_row(setup, split_equally(model, setup.unit, count), x, y, rtol) for count in copies)
    checks = pattern(rows)
    return {
        "rows": rows, "setups": [dataclasses.asdict(setup) for setup in setups], "checks": checks,
        "pattern_held": all(check["expected_pattern"] for check in checks.values()),
        "rtol": rtol, "critical_gradient": CRITICAL_GRADIENT, "seconds": round(time.perf_counter() - start, 1),
    }

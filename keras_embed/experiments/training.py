"""Train a deep MLP step by step, recording its loss and how linear its layers are.

The loop behind the BatchNormalization and data-size experiments: plain minibatch training
(`tf.function` step, seeded shuffling), the training loss every `record_every` steps (the
mean minibatch loss over those steps) and, at checkpoints, the fraction of units of every
hidden layer in a linear regime on a fixed probe set, measured by the shared analysis
code (`read_model`, `statistics.collect`, `regimes.producer_regimes`). The probe sees the network
in inference mode (BatchNormalization folded with its moving statistics; their momentum,
0.9 by default, makes them trail the batch statistics by about ten steps).

Example:
    >>> task = load_task("digits")
    >>> model = build_mlp(Settings.quick(), task, batch_norm=True, seed=0)
    >>> run = train(model, task, Settings.quick(), seed=0)
    >>> run.loss[-1] < run.loss[0], run.linear_fraction.shape   # (checkpoints, hidden layers)
    (True, (5, 4))
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_embed.files.data import DATASETS, bundled_dataset, load_data
from keras_embed.errors import InputError
from keras_embed.measure.regimes import producer_regimes
from keras_embed.measure.statistics import collect, producer_requests, tensors
from keras_embed.model.build import Prober, build_model, write_weights
from keras_embed.model.read import read_model


@dataclasses.dataclass(frozen=True)
class Settings:
    """Architecture and training settings; `batch_size=None` picks 128 on CPU, 512 on GPU."""

    depth: int = 8
    width: int = 64
    activation: str = "relu"
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    batch_size: int | None = None
    steps: int = 2000
    record_every: int = 10
    checkpoints: int = 10
    seeds: tuple = (0, 1, 2, 3, 4)
    probe_size: int = 512
    bn_momentum: float = 0.9
    mixed_precision: bool = False

    @classmethod
    def quick(cls, **changes):
        """A preset that runs in seconds on a laptop CPU."""
        return cls(**{"depth": 4, "width": 32, "steps": 200, "checkpoints": 4, "seeds": (0, 1), **changes})

    def __post_init__(self):
        for name in ("depth", "width", "steps", "record_every", "checkpoints", "probe_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1. Received: {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch-size must be at least 1. Received: {self.batch_size}")
        if not self.learning_rate > 0:
            raise InputError(f"learning-rate must be positive. Received: {self.learning_rate}")
        if not self.seeds:
            raise InputError("give at least one seed")
        if self.record_every > self.steps:
            raise InputError(f"record-every ({self.record_every}) exceeds steps ({self.steps}); lower it")


@dataclasses.dataclass(frozen=True)
class Task:
    """Training data and what to fit: `classes` > 0 for classification (sparse labels),
    0 for regression (MSE on `y` of shape (samples, outputs))."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: int

    @property
    def outputs(self):
        return self.classes or self.y.shape[1]

    @property
    def loss(self):
        if self.classes:
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return keras.losses.MeanSquaredError()

    def subset(self, rows):
        """The task on the given rows only."""
        return dataclasses.replace(self, name=f"{self.name}[{len(rows)}]", x=self.x[rows], y=self.y[rows])


def load_task(source):
    """A `Task` from a bundled dataset name or an `.npz` with `x` and `y` (integer y:
    classification; float y: regression)."""
    x, y = bundled_dataset(source) if source in DATASETS else load_data(source)
    if y is None:
        raise InputError(f"data '{source}' has no labels; save it with np.savez(path, x=x, y=y)")
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if len(y) != len(x) or len(x) == 0:
        raise InputError(f"data '{source}' has {len(x)} inputs and {len(y)} labels; give one label per input")
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise InputError(f"data '{source}' holds NaN or infinite values; clean it first")
    if np.issubdtype(y.dtype, np.integer):
        if y.min() < 0:
            raise InputError(f"data '{source}' has negative class labels; use labels 0, 1, ..., classes - 1")
        return Task(str(source), x, y.astype(np.int64).reshape(-1), int(y.max()) + 1)
    return Task(str(source), x, np.asarray(y, dtype=np.float32).reshape(len(y), -1), 0)


def build_mlp(settings, task, batch_norm, seed):
    """The experiment's MLP: `depth` blocks Dense -> [BatchNormalization] -> Activation, then
    a Dense output layer (logits or regression values). The Dense weights depend only on
    `seed`, so the models with and without BatchNormalization start from the same point."""
    keras.utils.set_random_seed(seed)
    dtype = "mixed_float16" if settings.mixed_precision else None
    layers = [keras.Input(shape=(task.x.shape[1],))]
    for index in range(settings.depth):
        layers.append(keras.layers.Dense(settings.width, name=f"dense_{index}", dtype=dtype))
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(momentum=settings.bn_momentum, name=f"bn_{index}", dtype=dtype))
        layers.append(keras.layers.Activation(settings.activation, name=f"{settings.activation}_{index}", dtype=dtype))
    layers.append(keras.layers.Dense(task.outputs, name="output", dtype="float32"))
    return keras.Sequential(layers, name="mlp_bn" if batch_norm else "mlp")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run.

    Attributes:
        seed: its seed.
        steps: step at which each loss was recorded.
        loss: mean minibatch training loss over the `record_every` steps before each.
        checkpoint_steps: steps at which linearity was measured (0 = before training).
        linear_fraction: (checkpoints, hidden layers) share of units in a linear regime.
    """

    seed: int
    steps: np.ndarray
    loss: np.ndarray
    checkpoint_steps: np.ndarray
    linear_fraction: np.ndarray

    @property
    def linearized_layers(self):
        """Per checkpoint, the number of hidden layers with every unit linear on the probe."""
        return (self.linear_fraction == 1.0).sum(axis=1)

    def to_dict(self):
        return {
            "seed": self.seed, "steps": self.steps.tolist(), "loss": self.loss.tolist(),
            "checkpoint_steps": self.checkpoint_steps.tolist(),
            "linear_fraction": self.linear_fraction.tolist(),
            "linearized_layers": self.linearized_layers.tolist(),
        }


def _hidden_requests(graph):
    return producer_requests(graph, graph.producers[:-1])


def linear_fractions(graph, x, probe=None):
    """Per hidden layer of `graph`, the share of units in a linear regime on inputs `x`."""
    stats = collect(graph, x, _hidden_requests(graph), batch_size=len(x), probe=probe)
    regimes = producer_regimes(graph, stats)
    return [float(regimes[node.name].linear.mean()) for node in graph.producers[:-1]]


def default_batch_size(device):
    return 512 if "GPU" in device.upper() else 128


def train(model, task, settings, seed, device="/CPU:0", on_step=None):
    """Trains `model` on `task` for `settings.steps` minibatch steps and returns the `Run`.

    `on_step(count)` is called as steps complete (for progress bars).
    """
    batch_size = min(settings.batch_size or default_batch_size(device), len(task.x))
    rng = np.random.default_rng(seed)
    probe_x = task.x[rng.permutation(len(task.x))[: settings.probe_size]]
    checkpoints = np.unique(np.linspace(0, settings.steps, settings.checkpoints + 1).round().astype(int))
    with tf.device(device):
        step = _train_step(model, task.loss, _optimizer(settings))
        graph = read_model(model)
        probe = Prober(build_model(graph, outputs=tensors(_hidden_requests(graph))))
        fractions, losses, block = [linear_fractions(graph, probe_x, probe)], [], []
        order = np.empty(0, dtype=int)
        for done in range(1, settings.steps + 1):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(task.x))])
            rows, order = order[:batch_size], order[batch_size:]
            block.append(step(task.x[rows], task.y[rows]))
            if done % settings.record_every == 0:
                losses.append(float(np.mean([float(loss) for loss in block])))
                block = []
            if done in checkpoints:
                graph = read_model(model)
                write_weights(probe.model, graph)
                fractions.append(linear_fractions(graph, probe_x, probe))
            if on_step is not None:
                on_step(1)
    recorded = np.arange(1, len(losses) + 1) * settings.record_every
    return Run(seed, recorded, np.asarray(losses), checkpoints, np.asarray(fractions))


def _optimizer(settings):
    optimizer = keras.optimizers.get({"class_name": settings.optimizer, "config": {"learning_rate": settings.learning_rate}})
    return keras.optimizers.LossScaleOptimizer(optimizer) if settings.mixed_precision else optimizer


def _train_step(model, loss_fn, optimizer):
    optimizer.build(model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            scaled = optimizer.scale_loss(loss) if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    return step

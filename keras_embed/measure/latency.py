"""Latency of a model on the runtime it will run on: TFLite's interpreter or a compiled Keras forward.

One call is timed on seeded inputs of the model's input shapes at `batch_size` rows: after
`WARMUP` untimed calls, calls are timed one by one until at least `MIN_CALLS` calls and
`MIN_SECONDS` have passed; the latency is their median, in milliseconds. TFLite converts
the model as `keras-embed prune -o model.tflite` writes it and runs the default interpreter
(XNNPACK on CPU) with `threads` threads; Keras runs `tf.function(model(x, training=False))`
on TensorFlow's own thread pools (set them for the process with TF_NUM_INTRAOP_THREADS).

Example:
    >>> Latency("tflite", batch_size=1, threads=1).milliseconds(model)
    0.042
"""

import dataclasses
import statistics
import time
import warnings

import numpy as np

from keras_embed.errors import InputError

RUNTIMES = ("tflite", "keras")
WARMUP = 3
MIN_CALLS = 20
MIN_SECONDS = 0.3


def _inputs(shapes_and_dtypes, batch_size):
    """Seeded standard-normal inputs (zeros for integer inputs) of the given (shape, dtype)s."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch_size, *shape)).astype(dtype) if np.issubdtype(dtype, np.floating)
            else np.zeros((batch_size, *shape), dtype=dtype) for shape, dtype in shapes_and_dtypes]


def _median_seconds(call):
    for _ in range(WARMUP):
        call()
    times, start = [], time.perf_counter()
    while len(times) < MIN_CALLS or time.perf_counter() - start < MIN_SECONDS:
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Latency:
    """How latency is measured: `runtime` ("tflite" or "keras"), rows per call, and the
    TFLite interpreter's threads."""

    runtime: str = "tflite"
    batch_size: int = 1
    threads: int = 1

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise InputError(f"--latency-on must be one of {', '.join(RUNTIMES)}. Received: {self.runtime!r}")
        for name in ("batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--latency-{name.replace('_size', '')} must be a positive integer. Received: {value!r}")

    def call(self, model):
        """A function running `model` once on the runtime (built here, not timed)."""
        return self._tflite_call(model) if self.runtime == "tflite" else self._keras_call(model)

    def milliseconds(self, model):
        """Median milliseconds of one call of `model` (see the module docstring)."""
        return 1000.0 * _median_seconds(self.call(model))

    def _tflite_call(self, model):
        import tensorflow as tf

        from keras_embed.files.save import tflite_flatbuffer

        with warnings.catch_warnings():  # its notice that LiteRT replaces it
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_content=tflite_flatbuffer(model), num_threads=self.threads)
        details = interpreter.get_input_details()
        for detail in details:
            interpreter.resize_tensor_input(detail["index"], (self.batch_size, *detail["shape"][1:]))
        interpreter.allocate_tensors()
        values = _inputs([(tuple(detail["shape"][1:]), detail["dtype"]) for detail in details], self.batch_size)
        for detail, value in zip(details, values):
            interpreter.set_tensor(detail["index"], value)
        return interpreter.invoke

    def _keras_call(self, model):
        import tensorflow as tf

        values = [tf.constant(value) for value in _inputs(
            [(tuple(tensor.shape[1:]), np.dtype(tensor.dtype)) for tensor in model.inputs], self.batch_size)]
        forward = tf.function(lambda inputs: model(inputs, training=False))
        arguments = values[0] if len(values) == 1 else values
        return lambda: tf.nest.map_structure(lambda tensor: tensor.numpy(), forward(arguments))

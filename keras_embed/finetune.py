"""Optional fine-tuning after approximate compression (`prune --finetune EPOCHS`).

Example:
    >>> tuned = finetune(pruned, x, y, epochs=20)       # a trained copy; `pruned` is untouched
"""

import keras
import numpy as np

from keras_embed.errors import InputError
from keras_embed.files.data import batches, concatenated, is_arrays
from keras_embed.model.read import read_model
from keras_embed.stopping import class_labels


def loss_for(model, y):
    """Sparse categorical cross-entropy for integer labels, categorical cross-entropy for
    one-hot rows (from logits unless the model ends in softmax), else mean squared error."""
    y = np.asarray(y)
    if class_labels(y) is None:
        return keras.losses.MeanSquaredError()
    graph = read_model(model)
    from_logits = graph.by_name[graph.outputs[0]].config.get("activation") != "softmax"
    if np.issubdtype(y.dtype, np.integer):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.CategoricalCrossentropy(from_logits=from_logits)


def check_one_output(model):
    """Refuses (`InputError`) a model of several outputs: `finetune` trains on one array y of targets."""
    if len(model.outputs) > 1:
        raise InputError(f"--finetune trains a model of one output on y; model '{model.name}' has "
                         f"{len(model.outputs)} outputs: fine-tune it with model.fit and a target per output")


def finetune(model, x, y, epochs, batch_size=32, learning_rate=1e-3, seed=0):
    """Trains a copy of `model` on (x, y) with Adam; returns the copy. `x` may be a dict of
    inputs by name, or any data `files.data.batches` reads (its rows are gathered for
    `model.fit`); the model must have one output (`check_one_output`).

    Raises:
        InputError: a model of several outputs.
    """
    check_one_output(model)
    keras.utils.set_random_seed(seed)
    tuned = keras.models.clone_model(model)
    tuned.set_weights(model.get_weights())
    tuned.compile(keras.optimizers.Adam(learning_rate), loss_for(model, y))
    x = x if is_arrays(x) else concatenated(batches(x))
    tuned.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    return tuned

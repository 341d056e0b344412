"""Optional fine-tuning after approximate compression (`prune --finetune EPOCHS`).

Example:
    >>> tuned = finetune(pruned, x, y, epochs=20)       # a trained copy; `pruned` is untouched
"""

import keras
import numpy as np

from keras_embed.read import read_model


def loss_for(model, y):
    """Sparse categorical cross-entropy for integer labels (from logits unless the model
    ends in softmax), else mean squared error."""
    if np.issubdtype(np.asarray(y).dtype, np.integer):
        ends_in_softmax = read_model(model).layers[-1].activations[-1] == "softmax"
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not ends_in_softmax)
    return keras.losses.MeanSquaredError()


def finetune(model, x, y, epochs, batch_size=32, learning_rate=1e-3, seed=0):
    """Trains a copy of `model` on (x, y) with Adam; returns the copy."""
    keras.utils.set_random_seed(seed)
    tuned = keras.models.clone_model(model)
    tuned.set_weights(model.get_weights())
    tuned.compile(keras.optimizers.Adam(learning_rate), loss_for(model, y))
    tuned.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    return tuned

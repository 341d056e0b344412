"""Writes the zoo example of `make demo`: `python saved_models/make_zoo_example.py FOLDER`.

FOLDER/mobilenetv2.keras: keras.applications.MobileNetV2 (alpha 0.35, 32x32 RGB, 10 classes,
built with weights=None as a new user builds it) trained a few seeded epochs on
scikit-learn's digits, enlarged 4x and repeated over three channels (nothing is
downloaded); FOLDER/mobilenetv2_digits.npz: the 360 held-out digits (x, y).
"""

import sys
from pathlib import Path

import numpy as np

from keras_embed.tools.common import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

EPOCHS = 4


def digit_images():
    """(images (n, 32, 32, 3) with values 0-255, labels) of the digits dataset."""
    digits = load_digits()
    images = np.kron(digits.images, np.ones((4, 4))) * (255.0 / 16.0)
    return np.repeat(images[..., None], 3, axis=-1).astype("float32"), digits.target


def main():
    folder = Path(sys.argv[1])
    keras.utils.set_random_seed(0)
    x, y = digit_images()
    order = np.random.default_rng(0).permutation(len(x))
    train, held_out = order[:-360], order[-360:]
    model = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=10)
    for layer in model.layers:  # Keras' 0.999 leaves the moving statistics far from the data after a few epochs
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[train] / 127.5 - 1.0, y[train], epochs=EPOCHS, batch_size=64, verbose=0)
    inputs = keras.Input((32, 32, 3), name="image")  # the preprocessing MobileNetV2 expects, as a layer
    scaled = keras.Model(inputs, model(keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)),
                         name="mobilenetv2_digits")
    scaled.save(folder / "mobilenetv2.keras")
    np.savez(folder / "mobilenetv2_digits.npz", x=x[held_out], y=y[held_out])
    accuracy = np.mean(np.argmax(scaled.predict(x[held_out], verbose=0), axis=1) == y[held_out])
    print(f"MobileNetV2 (alpha 0.35) trained {EPOCHS} epochs on digits: held-out accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()

"""Image folders as --data and --validation: Keras' image_dataset_from_directory conventions,
read lazily, labels from the class folders; the progress bar with rows/s."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_embed.files.data import batches, load_checked
from keras_embed.files.images import ImageFolder
from keras_embed.tools.cli import main

IMAGES = 2000


@pytest.fixture(scope="module")
def folder(tmp_path_factory, saved_models):
    """2,000 16x16 grayscale PNGs of the digits (upsampled from 8x8, 0-255), a sub-folder per digit."""
    from keras_embed.files.data import bundled_dataset

    x, y = bundled_dataset("digits")
    root = tmp_path_factory.mktemp("digits_png")
    for index in range(IMAGES):
        row = index % len(x)
        image = tf.image.resize(x[row].reshape(8, 8, 1) * 255, (16, 16), method="nearest")
        (root / f"digit_{y[row]}").mkdir(exist_ok=True)
        tf.io.write_file(str(root / f"digit_{y[row]}" / f"{index:04d}.png"), tf.io.encode_png(tf.cast(image, tf.uint8)))
    return root


@pytest.fixture(scope="module")
def rescaled_cnn(tmp_path_factory, saved_models):
    """The digits CNN behind Rescaling(1/255) and a 2x average pooling, on (16, 16, 1) images."""
    cnn = keras.saving.load_model(saved_models / "digits_cnn.keras")
    image = keras.Input((16, 16, 1), name="image")
    x = keras.layers.AveragePooling2D(2)(keras.layers.Rescaling(1 / 255)(image))
    path = tmp_path_factory.mktemp("model") / "digits_cnn_16.keras"
    keras.Model(image, cnn(x), name="digits_cnn_16").save(path)
    return path


def test_the_folder_reads_as_image_dataset_from_directory_does(folder, rescaled_cnn):
    model = keras.saving.load_model(rescaled_cnn)
    images, labels = load_checked(folder, model)
    assert isinstance(images, ImageFolder) and images.shape == (IMAGES, 16, 16, 1)
    expected = keras.utils.image_dataset_from_directory(folder, image_size=(16, 16), color_mode="grayscale",
                                                         shuffle=False, batch_size=512)
    expected_images = np.concatenate([batch for batch, _ in expected])
    expected_labels = np.concatenate([label for _, label in expected])
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(np.concatenate(list(batches(images, 300))), expected_images, atol=1e-4)
    np.testing.assert_allclose(images[[5, 1999, 0]], expected_images[[5, 1999, 0]], atol=1e-4)


def test_the_cli_prunes_on_image_folders_with_labels_from_their_names(folder, rescaled_cnn, tmp_path):
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["prune", str(rescaled_cnn), "-o", str(tmp_path / "small.keras"),
                                       "--data", str(folder), "--validation", str(folder), "--mode", "data",
                                       "--max-accuracy-drop", "2", "--report", str(report), "--progress"])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["accuracy_before"] > 0.9  # the labels are the folder names, in order
    assert figures["accuracy_drop"] <= 2
    assert "statistics" in result.output and "rows/s" in result.output  # --progress: a bar on a pipe too


def test_no_progress_bar_on_a_pipe_without_the_flag(folder, rescaled_cnn):
    result = CliRunner().invoke(main, ["analyze", str(rescaled_cnn), "--data", str(folder)])
    assert result.exit_code == 0, result.output
    assert "rows/s" not in result.output


@pytest.mark.parametrize("layout, message", [
    ("empty", "holds no images in class sub-folders"),
    ("broken", "could not be decoded"),
])
def test_unusable_folders_are_refused_in_one_line(tmp_path, rescaled_cnn, layout, message):
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    if layout == "broken":
        (data / "cats" / "one.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["analyze", str(rescaled_cnn), "--data", str(data)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_model_that_takes_no_images_refuses_a_folder(folder, saved_models):
    result = CliRunner().invoke(main, ["analyze", str(saved_models / "digits_widened.keras"), "--data", str(folder)])
    assert result.exit_code == 2
    assert "needs an input of (height, width" in result.output


def test_max_samples_spreads_over_every_kind_of_array(folder, rescaled_cnn, tmp_path):
    from keras_embed.files.data import LazyCast, spread_rows

    images, labels = load_checked(folder, keras.saving.load_model(rescaled_cnn))
    few, few_labels = spread_rows(images, 100), spread_rows(labels, 100)
    assert isinstance(few, ImageFolder) and len(few) == len(few_labels) == 100
    assert set(few_labels) == set(labels)  # every class, though the folder is sorted by class
    np.testing.assert_array_equal(few[3], images[60])
    np.save(tmp_path / "x.npy", np.arange(30.0).reshape(10, 3))
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert isinstance(spread_rows(mapped, 4), np.memmap)  # still read from disk as needed
    np.testing.assert_array_equal(spread_rows(LazyCast(mapped, "float32"), 4)[:], mapped[::3].astype("float32"))
    np.testing.assert_array_equal(spread_rows({"a": np.arange(10)}, 20)["a"], np.arange(10))


def test_the_cli_bounds_every_pass_with_max_samples(folder, rescaled_cnn, tmp_path):
    result = CliRunner().invoke(main, ["prune", str(rescaled_cnn), "-o", str(tmp_path / "small.keras"),
                                       "--data", str(folder), "--validation", str(folder), "--max-samples", "250",
                                       "--mode", "data", "--keep-ratio", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy_before"] > 0.9  # on 250 rows of every class

"""An image folder as calibration data: one sub-folder per class, read as batches need it.

The layout and conventions of `keras.utils.image_dataset_from_directory`: the sub-folders
of the folder, sorted by name, are the classes (label i for the i-th), each holding image
files (.bmp, .gif, .jpeg, .jpg, .png, any letter case) at any depth, decoded with
TensorFlow's decoders to the model's channels (1 grayscale, 3 RGB, 4 RGBA) and resized with
bilinear interpolation to the model's input size, values in [0, 255] as float32. Files
are in sorted order, not shuffled. An `ImageFolder` is an array of those images that
decodes only the rows asked for (in parallel, in a tf.data map), so a pass over any number
of files holds one batch.

Example:
    >>> images, labels = image_folder("photos/", model)     # photos/cat/*.png, photos/dog/*.jpg
    >>> images.shape, labels[:3]
    ((2000, 64, 64, 3), array([0, 0, 0]))
"""

from pathlib import Path

import numpy as np

from keras_embed.errors import InputError

FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what image_dataset_from_directory reads


class ImageFolder:
    """The images `files` as one lazy (rows, height, width, channels) float32 array.

    Example:
        >>> ImageFolder(["a.png", "b.png"], (32, 32), 3)[:2].shape
        (2, 32, 32, 3)
    """

    def __init__(self, files, size, channels, dtype="float32"):
        self.files, self.size, self.channels = list(files), tuple(size), channels
        self.dtype = np.dtype(dtype)
        self.shape, self.ndim = (len(self.files), *self.size, channels), 4

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        import tensorflow as tf

        chosen = np.arange(len(self.files))[key]
        if np.ndim(chosen) == 0:
            return self[[int(chosen)]][0]
        paths = [self.files[index] for index in chosen]
        if not paths:
            return np.empty((0, *self.shape[1:]), self.dtype)
        decoded = tf.data.Dataset.from_tensor_slices(paths).map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)
        try:
            images = next(iter(decoded.batch(len(paths))))
        except tf.errors.InvalidArgumentError:
            for path in paths:  # which one: decoded alone, it names itself
                self._decode_one(path)
            raise
        return images.numpy().astype(self.dtype, copy=False)

    def _decode(self, path):
        import tensorflow as tf

        image = tf.io.decode_image(tf.io.read_file(path), channels=self.channels, expand_animations=False)
        return tf.image.resize(image, self.size, method="bilinear")

    def _decode_one(self, path):
        import tensorflow as tf

        try:
            self._decode(tf.constant(path))
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
            raise InputError(f"image '{path}' could not be decoded ({error.message.splitlines()[0]}); "
                             "remove it or save it again as PNG or JPEG") from None

    def __array__(self, dtype=None, copy=None):  # every image at once: for model.fit and the like
        return np.asarray(self[:], dtype=dtype or self.dtype)


def image_folder(path, spec):
    """(`ImageFolder`, int64 labels from the class sub-folders) of the folder `path`, sized
    for `spec` (name, shape (height, width, channels), dtype), an image input.

    Raises:
        InputError: a model input that is not an image of known size and 1, 3 or 4 channels,
            a folder without class sub-folders or without images.
    """
    path, (name, shape, dtype) = Path(path), spec
    if len(shape) != 3 or None in shape or shape[-1] not in (1, 3, 4):
        shown = ", ".join("n" if size is None else str(size) for size in (None, *shape))
        raise InputError(f"'{path}' is an image folder but the model input '{name}' takes ({shown}); an image "
                         "folder needs an input of (height, width, 1, 3 or 4 channels) of known size")
    classes = sorted(child for child in path.iterdir() if child.is_dir())
    files, labels = [], []
    for label, folder in enumerate(classes):
        found = sorted(str(file) for file in folder.rglob("*") if file.is_file() and file.suffix.lower() in FORMATS)
        files += found
        labels += [label] * len(found)
    if not files:
        raise InputError(f"folder '{path}' holds no images in class sub-folders ({', '.join(FORMATS)}); lay it out "
                         "as image_dataset_from_directory reads it (one sub-folder per class), or save a tf.data.Dataset there "
                         "with Dataset.save")
    return ImageFolder(files, shape[:2], shape[-1], dtype), np.asarray(labels, dtype=np.int64)

"""Where a command computes: `--device auto|cpu|gpu`, resolved to one TensorFlow device.

auto takes the first GPU TensorFlow sees, else the CPU; gpu refuses a machine without one.
The code that runs there keeps to operations both have (float32/float64, no CPU-only
kernels), so a result differs between them only by rounding.

Example:
    >>> name, record = resolve_device("auto")      # on a machine without a GPU
    >>> name, record
    ('/CPU:0', {'requested': 'auto', 'used': '/CPU:0', 'gpus_visible': 0})
    >>> with tf.device(name): ...
"""

from keras_embed.errors import InputError

DEVICES = ("auto", "cpu", "gpu")


def resolve_device(device="auto"):
    """(TensorFlow device name, record {requested, used, gpus_visible}) for `device`.

    Raises:
        InputError: an unknown name, or gpu where TensorFlow sees none.
    """
    import tensorflow as tf

    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'; choose {', '.join(DEVICES)}")
    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        raise InputError("--device gpu, but TensorFlow sees no GPU here; use --device auto or cpu")
    name = "/GPU:0" if gpus and device != "cpu" else "/CPU:0"
    return name, {"requested": device, "used": name, "gpus_visible": len(gpus)}

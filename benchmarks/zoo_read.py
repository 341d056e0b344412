"""Reads and rebuilds every keras.applications architecture: `python benchmarks/zoo_read.py [NAME ...]`.

Per architecture (the builds of tests/test_zoo.py: weights=None, small inputs, BatchNormalization
statistics from 8 seeded images): nodes and editable channel groups of the graph, the relative
output difference of `build_model(read_model(model))` (BatchNormalization folded) on those
images, and the outputs' relative change when every input moves by a factor 1 + 1e-7 (the
model's own sensitivity: benchmarks/ZOO.md). Prints one Markdown row per architecture.
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

from builders import batchnorm_from_data  # noqa: E402
from keras_embed.model.build import build_model  # noqa: E402
from keras_embed.model.read import read_model  # noqa: E402
from test_zoo import APPLICATIONS, application  # noqa: E402


def row(name):
    start = time.perf_counter()
    model = application(name)
    x = np.random.default_rng(0).uniform(0, 255, (8, *model.input_shape[1:])).astype("float32")
    batchnorm_from_data(model, x)
    expected = model.predict(x, verbose=0)
    scale = np.abs(expected).max()
    graph = read_model(model)
    rebuilt = build_model(graph).predict(x, verbose=0)
    moved = model.predict(x * np.float32(1 + 1e-7), verbose=0)
    return (f"| {name} | {len(graph.nodes)} | {len(graph.editable_groups())} | {np.abs(rebuilt - expected).max() / scale:.1e} "
            f"| {np.abs(moved - expected).max() / scale:.1e} | {time.perf_counter() - start:.0f} |")


def main():
    print("| architecture | nodes | editable groups | rebuilt: rel. diff | sensitivity to 1e-7 | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in sys.argv[1:] or APPLICATIONS:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()

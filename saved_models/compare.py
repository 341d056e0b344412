"""Compares two models' widths and outputs: `python saved_models/compare.py A B --data D`.

Used by `make demo` to show the pruned model is the narrow one it was grown from.
Exits 1 when the max abs output difference exceeds --atol (default 1e-4).
"""

import argparse
import sys

import numpy as np

from keras_embed.tools.common import quiet_tensorflow

quiet_tensorflow()

from keras_embed.files.data import check_inputs, load_array  # noqa: E402
from keras_embed.files.load import load_model  # noqa: E402
from keras_embed.model.read import read_model  # noqa: E402
from keras_embed.verify import predict  # noqa: E402


def widths(model):
    """Units or channels of every Dense and convolution layer."""
    return read_model(model).widths


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--data", required=True)
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    first, second = load_model(args.first), load_model(args.second)
    x = check_inputs(load_array(args.data), first)
    diff = float(np.abs(predict(first, x) - predict(second, x)).max())
    print(f"widths {widths(first)} vs {widths(second)}; "
          f"params {first.count_params()} vs {second.count_params()}; max abs output difference {diff:.2e}")
    sys.exit(0 if diff <= args.atol else 1)


if __name__ == "__main__":
    main()

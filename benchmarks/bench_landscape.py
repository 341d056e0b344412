"""How much of the straight-line barrier between seeds is a permutation of units (issue 22).

Three 64-32-32-10 relu MLPs, trained with seeds 0, 1 and 2 (`keras.utils.set_random_seed`),
Adam 1e-3, sparse categorical cross-entropy from logits, 20 epochs of batch 32 on the
training split of scikit-learn's digits (`keras_embed.experiments.taxonomy.digits_split`:
a seeded permutation, 2/3 to train). For each pair of seeds, on the training rows:
`keras_embed.landscape.compare.compare_models(..., align_units=True)`, Bézier bends trained
50 epochs: the L2 distance of the weights, the straight line's mc (training error, points)
and loss barrier, the trained Bézier curve's mc; raw and after aligning the second model's
units to the first's (`landscape.align`), with the mean correlation of the matched units.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_embed.experiments.taxonomy import digits_split  # noqa: E402
from keras_embed.landscape.compare import compare_models  # noqa: E402

INTERPRETATION = """\
A straight line between two seeds crosses a barrier of tens of error points; matching the units first removes most
of it, and what is left is the part of the barrier that is not a relabelling of units. The trained Bézier curve
connects the seeds with or without alignment (mc within a few points of 0): the solutions lie on one connected
low-loss set, and part of what separates them in weight space is the permutation symmetry the Embedding Principle's
critical manifolds are built from."""


def trained(seed, x, y):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)], name=f"seed{seed}")
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    return model


def table(figures):
    lines = ["| pair | | distance | linear mc (points) | linear loss barrier | Bézier mc (points) | matched correlation |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for pair in figures["pairs"]:
        for kind, part in (("raw", pair), ("aligned", pair["aligned"])):
            matched = ", ".join(f"{value:.2f}" for value in part.get("matched", {}).values()) or "-"
            lines.append(f"| {pair['first']}-{pair['second']} | {kind} | {part['distance']:.2f} | {part['linear']['mc']:.1f} "
                         f"| {part['linear']['barrier']:.3f} | {part['bezier']['mc']:.1f} | {matched} |")
    return "\n".join(lines)


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from results import load, section, write_section

    before = load()
    x, y, _, _ = digits_split()
    figures = compare_models([trained(seed, x, y) for seed in range(3)], x, y, "sparse_categorical_crossentropy",
                             from_logits=True, align_units=True)
    text = section("Alignment and mode connectivity between seeds (benchmarks/bench_landscape.py)",
                   "benchmarks/bench_landscape.py", before, __doc__, [table(figures)], INTERPRETATION)
    print(text)
    write_section("landscape", text)


if __name__ == "__main__":
    main()

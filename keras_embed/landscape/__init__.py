"""The global half of the loss-landscape taxonomy (Yang et al., NeurIPS 2021) for Keras models.

`similarity` (linear CKA), `paths` (weight distance, the linear path and the quadratic
Bézier curve between two models, mode connectivity), `align` (units matched between two
models before they are compared) and `compare` (all of it for several models, with the
local half from `keras_embed.hessian`).

Example:
    >>> figures = compare_models([model_a, model_b], x, y, "sparse_categorical_crossentropy", from_logits=True)
    >>> figures["pairs"][0]["cka_output"], figures["pairs"][0]["bezier"]["mc"]
    (0.97, -0.4)
"""

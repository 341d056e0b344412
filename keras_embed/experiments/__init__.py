"""Experiments from the Embedding Principle papers, run on the user's architecture and data.

One module per experiment: `bn_ablation` (BatchNormalization against layer linearization,
and the effect of data size) and `strict_saddle` (a narrow local minimum embedded into a
wider network becomes a strict saddle). Each returns plain results; `keras_embed.tools`
writes them (json, csv, markdown, png).
"""

"""Keras callbacks that watch training for critical points embedded from smaller networks.

Example:
    >>> from keras_embed.callbacks import EmbeddingMonitor
    >>> model.fit(x, y, epochs=100, callbacks=[EmbeddingMonitor(x[:1000], action="warn")])
"""

from keras_embed.callbacks.monitor import BatchEmbeddingMonitor, EmbeddingMonitor, escape

__all__ = ["BatchEmbeddingMonitor", "EmbeddingMonitor", "escape"]

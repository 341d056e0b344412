"""Keras callbacks that watch training for embedded critical points (see issue on callbacks)."""

"""The colour-histogram baseline (``extract.model=color_hist``): an HSV histogram, no CNN.

The descriptor of the first seed system: hue, saturation and value quantised into
``bins`` (for example 8 x 12 x 3), counted per cell of a ``grid`` x ``grid`` split of the
image (1: the whole image; 2: four quarters, concatenated), each cell L1-normalised.
Histograms are compared by Pearson correlation, which is the cosine of the centred
vectors: the model outputs ``h - mean(h)``, and extract's L2 normalisation then makes the
project's angular metric exactly that correlation (``tests/models/test_color_hist.py``).

It is a small Keras model, saved once per setting as a ``.keras`` file like the converted
EfficientNet-Lite files, so extract ships and rebuilds it as any backbone: the counting
runs inside TensorFlow on the decoded ``image_size`` pixels (128 by default).
"""

from __future__ import annotations

import os

import numpy as np

NAME = "color_hist"
DEFAULT_SIZE = 128


def parse_bins(text: str) -> tuple[int, int, int]:
    """``"8x12x3"`` -> ``(8, 12, 3)``; a ValueError names the problem."""
    parts = str(text).lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"must be HxSxV bin counts such as 8x12x3, got {text!r}")
    bins = tuple(int(p) for p in parts)
    if not all(1 <= b <= 64 for b in bins):
        raise ValueError(f"each bin count must be in 1..64, got {text!r}")
    return bins  # type: ignore[return-value]


def dim(bins: tuple[int, int, int], grid: int) -> int:
    return int(np.prod(bins)) * grid * grid


def _layer_class():
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="cbir")
    class HSVHistogram(keras.layers.Layer):
        """0..255 RGB ``(B, H, W, 3)`` -> centred, per-cell L1-normalised HSV histograms."""

        def __init__(self, bins=(8, 12, 3), grid=1, **kwargs):
            super().__init__(**kwargs)
            self.bins = tuple(int(b) for b in bins)
            self.grid = int(grid)

        def call(self, x):
            hb, sb, vb = self.bins
            n_bins = hb * sb * vb
            hsv = tf.image.rgb_to_hsv(tf.clip_by_value(tf.cast(x, tf.float32) / 255.0, 0.0, 1.0))

            def q(c, n):
                return tf.minimum(tf.cast(tf.floor(hsv[..., c] * n), tf.int32), n - 1)

            idx = (q(0, hb) * sb + q(1, sb)) * vb + q(2, vb)  # (B, H, W)
            shape = tf.shape(idx)
            b, h, w = shape[0], shape[1], shape[2]
            g = self.grid
            rows = tf.minimum(tf.range(h) * g // h, g - 1)
            cols = tf.minimum(tf.range(w) * g // w, g - 1)
            cell = rows[:, None] * g + cols[None, :]  # (H, W)
            per = n_bins * g * g
            seg = tf.range(b)[:, None, None] * per + cell[None] * n_bins + idx
            counts = tf.math.unsorted_segment_sum(tf.ones_like(seg, tf.float32), seg, b * per)
            hist = tf.reshape(counts, [b, g * g, n_bins])
            hist = hist / tf.maximum(tf.reduce_sum(hist, axis=2, keepdims=True), 1.0)
            flat = tf.reshape(hist, [b, per])
            return flat - tf.reduce_mean(flat, axis=1, keepdims=True)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], dim(self.bins, self.grid))

        def get_config(self):
            return {**super().get_config(), "bins": list(self.bins), "grid": self.grid}

    return HSVHistogram


HSVHistogram = None


def layer_class():
    """The registered Keras layer (built on first use, so importing this module needs no TF)."""
    global HSVHistogram
    if HSVHistogram is None:
        HSVHistogram = _layer_class()
    return HSVHistogram


def build(bins: tuple[int, int, int], grid: int, image_size: int):
    import keras

    inp = keras.Input((image_size, image_size, 3), name="image")
    out = layer_class()(bins=bins, grid=grid, name="hsv_histogram")(inp)
    return keras.Model(inp, out, name=NAME)


def model_file(bins: tuple[int, int, int], grid: int, image_size: int, cache_dir: str) -> str:
    """The saved model of one setting, written once under ``cache_dir`` (temporary name, then
    renamed, as the converted backbones are)."""
    os.makedirs(cache_dir, exist_ok=True)
    dst = os.path.join(cache_dir, f"{NAME}-{'x'.join(map(str, bins))}-g{grid}-{image_size}.keras")
    if not os.path.exists(dst):
        tmp = f"{dst}.{os.getpid()}.tmp.keras"
        build(bins, grid, image_size).save(tmp)
        os.replace(tmp, dst)
    return dst

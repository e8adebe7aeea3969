"""The learned head of Lin et al. (CVPRW 2015) on top of frozen embeddings.

``embedding -> Dense(hidden, ReLU) -> Dense(B, sigmoid) "code" -> Dense(C, softmax) "classes"``

- ``code``: B sigmoid units between the hidden layer and the classifier, thresholded at
  0.5 into the B-bit code (the latent layer H of the paper);
- ``features``: the same units as floats, ``2 h - 1`` (L2-normalised for search), so the
  code is exactly their sign pattern. The paper re-ranks by fc7, the layer below H; on
  clothing-small the latent floats measured better (P@10 0.90-0.91 against 0.88-0.89 for
  the hidden layer, benchmarks/results/finetune.json), and they are B-dimensional;
- ``classes``: the classifier that trains them.

Training adds two optional terms on the code activations (from the paper's follow-up, SSDH,
Yang et al. TPAMI 2017): ``binarise`` pushes them away from 0.5 and ``balance`` pushes every
bit towards firing for half the images. The saved model carries no custom objects, so any
Keras loads it. Inference in extract and ``cbir query`` is the same arithmetic in numpy
(:func:`cbir_lib.models.head.apply_head`), so executors need no TensorFlow for it. This
module holds the Keras side: building, the losses, reading the weights out.
"""

from __future__ import annotations

import numpy as np

from cbir_lib.models.head import LAYERS


def build_head(
    input_dim: int, n_classes: int, bits: int, hidden: int, dropout: float = 0.0, binarise: float = 0.0, balance: float = 0.0, seed: int = 0
):
    """The Keras head. With ``binarise``/``balance`` > 0 the code layer carries the extra terms
    as an activity regulariser: train that model, then copy its weights into one built
    without them (:func:`clean_copy`) to save a model that needs no custom objects."""
    import tensorflow as tf

    keras = tf.keras
    init = keras.initializers.GlorotUniform(seed=seed)
    x = inp = keras.Input((input_dim,), name="embedding")
    if dropout:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    h = keras.layers.Dense(hidden, activation="relu", kernel_initializer=init, name="hidden")(x)
    reg = _CodeTerms(binarise, balance) if (binarise or balance) else None
    code = keras.layers.Dense(bits, activation="sigmoid", kernel_initializer=init, activity_regularizer=reg, name="code")(h)
    feats = keras.layers.Rescaling(2.0, offset=-1.0, name="features")(code)
    classes = keras.layers.Dense(n_classes, activation="softmax", kernel_initializer=init, name="classes")(code)
    return keras.Model(inp, {"features": feats, "code": code, "classes": classes}, name="cbir_head")


def clean_copy(model, input_dim: int, n_classes: int, bits: int, hidden: int):
    """The same head without dropout or regularisers, holding ``model``'s weights."""
    out = build_head(input_dim, n_classes, bits, hidden)
    for name in LAYERS:
        out.get_layer(name).set_weights(model.get_layer(name).get_weights())
    return out


def _code_terms_class():
    import tensorflow as tf

    class CodeTerms(tf.keras.regularizers.Regularizer):
        """``-binarise * mean((h - 0.5)^2) + balance * mean_j (mean_i h_ij - 0.5)^2``."""

        def __init__(self, binarise: float, balance: float):
            self.binarise, self.balance = float(binarise), float(balance)

        def __call__(self, h):
            loss = -self.binarise * tf.reduce_mean(tf.square(h - 0.5))
            return loss + self.balance * tf.reduce_mean(tf.square(tf.reduce_mean(h, axis=0) - 0.5))

        def get_config(self):
            return {"binarise": self.binarise, "balance": self.balance}

    return CodeTerms


def _CodeTerms(binarise: float, balance: float):  # noqa: N802 - a lazy class (TensorFlow loads on use)
    return _code_terms_class()(binarise, balance)


def metric_loss(kind: str, margin: float):
    """A Keras loss ``(labels, features) -> scalar`` with batch-hard mining (Hermans et al.
    2017): for each anchor, its farthest same-class and its nearest other-class image in the
    batch, by squared distance ``d`` of the L2-normalised features (0..4).

    - ``triplet``: ``mean(relu(d(a, p_hard) - d(a, n_hard) + margin))``;
    - ``contrastive``: ``mean(d(a, p_hard) + relu(margin - d(a, n_hard)))``.

    Anchors without a positive or a negative in the batch are left out."""
    import tensorflow as tf

    def loss(labels, features):
        y = tf.reshape(tf.cast(labels, tf.int64), [-1])
        x = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=1)
        d = tf.maximum(2.0 - 2.0 * tf.matmul(x, x, transpose_b=True), 0.0)
        same = tf.equal(y[:, None], y[None, :])
        eye = tf.eye(tf.shape(x)[0], dtype=tf.bool)
        pos = tf.logical_and(same, tf.logical_not(eye))
        neg = tf.logical_not(same)
        hard_pos = tf.reduce_max(tf.where(pos, d, tf.zeros_like(d)), axis=1)
        hard_neg = tf.reduce_min(tf.where(neg, d, tf.fill(tf.shape(d), 4.0)), axis=1)
        if kind == "triplet":
            per = tf.nn.relu(hard_pos - hard_neg + margin)
        else:
            per = hard_pos + tf.nn.relu(margin - hard_neg)
        valid = tf.cast(tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1)), tf.float32)
        return tf.reduce_sum(per * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)

    return loss


def head_weights(model) -> dict[str, np.ndarray]:
    """The head's weights by layer: ``{name/kernel, name/bias}`` for hidden, code, classes."""
    out = {}
    for name in LAYERS:
        kernel, bias = model.get_layer(name).get_weights()
        out[f"{name}/kernel"] = np.asarray(kernel, dtype=np.float32)
        out[f"{name}/bias"] = np.asarray(bias, dtype=np.float32)
    return out

"""train.loss=triplet|contrastive: batch-hard metric losses against numpy, and they train."""

import numpy as np
import pytest

from cbir_lib.config import TrainConfig
from cbir_lib.finetune.head import metric_loss


def _numpy_batch_hard(y, x, kind, margin):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.maximum(2 - 2 * x @ x.T, 0)
    out = []
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [j for j in range(len(y)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        p, n = d[i, pos].max(), d[i, neg].min()
        out.append(max(p - n + margin, 0) if kind == "triplet" else p + max(margin - n, 0))
    return float(np.mean(out))


@pytest.mark.parametrize("kind", ["triplet", "contrastive"])
def test_batch_hard_loss_against_numpy(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])  # class 4 has no positive: left out
    got = float(metric_loss(kind, 0.3)(y, x))
    assert got == pytest.approx(_numpy_batch_hard(y, x, kind, 0.3), rel=1e-5)


@pytest.mark.parametrize("kind", ["triplet", "contrastive"])
def test_the_metric_loss_decreases_on_a_tiny_labelled_set(kind):
    import tensorflow as tf

    from cbir_lib.finetune.head import head_weights
    from cbir_lib.finetune.run import fit_head
    from cbir_lib.models.head import apply_head

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))
    y = np.repeat(np.arange(3), 40)
    x = (centres[y] + 1.5 * rng.normal(size=(120, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tc = TrainConfig(bits=16, hidden=32, epochs=25, batch_size=30, learning_rate=5e-3, dropout=0.0, loss=kind, margin=0.5)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(120, seed=0).repeat().batch(30)
    model, history = fit_head(ds, 4, 16, ["a", "b", "c"], tc, log_every=False)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"], [h["loss"] for h in history]
    feats, _, _ = apply_head(head_weights(model), x)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    s = f @ f.T
    np.fill_diagonal(s, -np.inf)
    assert (y[s.argmax(1)] == y).mean() > 0.9  # nearest neighbours share their class

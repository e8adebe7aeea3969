"""Global descriptors from a CNN feature map, in plain numpy.

All functions take a batch of non-negative feature maps ``(B, H, W, C)`` (post-ReLU)
and return ``(B, C)`` float32, L2-normalised.

- ``gap``: global average pooling (SPoC without centring prior), Babenko & Lempitsky 2015.
- ``mac``: global max pooling, Tolias et al. 2016.
- ``gem``: generalised mean ``(mean x^p)^(1/p)``, Radenović et al. 2018; p=1 is GAP,
  p -> inf approaches MAC.
- ``crow``: cross-dimensional weighting, Kalantidis et al. 2016: spatial weights from
  the normalised channel-sum map, channel weights from inverse channel sparsity.
- ``rmac``: regional MAC, Tolias et al. 2016: MAC over a multi-scale grid of square
  regions with ~40 % overlap, each L2-normalised, summed with the global MAC.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, EPS)


def _check(fmap: np.ndarray) -> np.ndarray:
    fmap = np.asarray(fmap, dtype=np.float32)
    if fmap.ndim != 4:
        raise ValueError(f"expected a feature map batch of shape (B, H, W, C), got shape {fmap.shape}")
    return fmap


def gap(fmap: np.ndarray) -> np.ndarray:
    return l2_normalize(_check(fmap).mean(axis=(1, 2)))


def mac(fmap: np.ndarray) -> np.ndarray:
    return l2_normalize(_check(fmap).max(axis=(1, 2)))


def gem(fmap: np.ndarray, p: float = 3.0) -> np.ndarray:
    x = np.maximum(_check(fmap), EPS).astype(np.float64)
    return l2_normalize(np.power(np.power(x, p).mean(axis=(1, 2)), 1.0 / p))


def crow(fmap: np.ndarray, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    x = np.maximum(_check(fmap), 0.0)
    b_, h, w, c = x.shape
    s = x.sum(axis=3)  # (B, H, W) aggregated response per location
    z = np.power(np.power(s, a).sum(axis=(1, 2), keepdims=True), 1.0 / a)
    spatial = np.power(s / np.maximum(z, EPS), 1.0 / b)  # (B, H, W)
    nonzero = (x > 0).mean(axis=(1, 2))  # (B, C) fraction of locations where a channel fires
    total = nonzero.sum(axis=1, keepdims=True)
    channel = np.where(nonzero > 0, np.log(np.maximum(total, EPS) / np.maximum(nonzero, EPS)), 0.0)
    pooled = (x * spatial[..., None]).sum(axis=(1, 2))
    return l2_normalize(pooled * channel)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int]]:
    """Square regions ``(top, left, side)`` of the R-MAC grid on an ``h`` x ``w`` map.

    Follows the reference implementation (Tolias et al.; Radenović's cirtorch): side
    ``floor(2 m / (l + 1))`` at level ``l`` for ``m = min(h, w)``, with the number of
    extra steps along the long side chosen to give about ``overlap`` between regions.
    """
    steps = np.array([2, 3, 4, 5, 6, 7])
    m = min(h, w)
    b = (max(h, w) - m) / (steps - 1)
    idx = int(np.argmin(np.abs(((m * m - m * b) / (m * m)) - overlap)))
    wd = idx + 1 if h < w else 0
    hd = idx + 1 if h > w else 0
    regions: list[tuple[int, int, int]] = []
    for level in range(1, levels + 1):
        side = int(np.floor(2 * m / (level + 1)))
        if side < 1:
            continue
        half = int(np.floor(side / 2 - 1))
        bw = (w - side) / (level + wd - 1) if level + wd > 1 else 0
        bh = (h - side) / (level + hd - 1) if level + hd > 1 else 0
        lefts = np.floor(half + np.arange(level + wd) * bw).astype(int) - half
        tops = np.floor(half + np.arange(level + hd) * bh).astype(int) - half
        for top in tops:
            for left in lefts:
                regions.append((int(top), int(left), side))
    return regions


def rmac(fmap: np.ndarray, levels: int = 3) -> np.ndarray:
    x = _check(fmap)
    _, h, w, _ = x.shape
    total = l2_normalize(x.max(axis=(1, 2)))
    for top, left, side in rmac_regions(h, w, levels):
        region = x[:, top : top + side, left : left + side, :]
        total = total + l2_normalize(region.max(axis=(1, 2)))
    return l2_normalize(total)


def pwa_select(channel_sums: np.ndarray, parts: int) -> np.ndarray:
    """PWA's part detectors (Xu et al., AAAI 2018): the ``parts`` channels whose sum-pooled
    responses vary most over a sample of images (``channel_sums``: ``(n, C)``), ties by
    channel index; sorted ascending, so the descriptor's layout does not depend on the sample order."""
    v = np.asarray(channel_sums, np.float64).var(axis=0)
    order = np.lexsort((np.arange(v.size), -v))
    return np.sort(order[:parts]).astype(np.int64)


def pwa(fmap: np.ndarray, channels: np.ndarray, alpha: float = 2.0, beta: float = 2.0) -> np.ndarray:
    """Part-based weighting aggregation: for each selected channel ``n``, the weight map
    ``w_n = (f_n / ||f_n||_alpha) ** (1 / beta)`` sum-pools the whole feature map into a
    C-dim part vector; the parts are concatenated (``len(channels) x C``) and L2-normalised.
    The paper then PCA-whitens the result (``extract.whitening``, ``whitening_dim``)."""
    arr = _check(fmap)
    chans = np.asarray(channels, np.int64)
    f = np.maximum(arr[..., chans], 0.0)  # (B, h, w, N); post-ReLU maps are >= 0 anyway
    norm = np.power(np.power(f, alpha).sum(axis=(1, 2), keepdims=True), 1.0 / alpha)
    w = np.power(f / np.maximum(norm, 1e-12), 1.0 / beta)
    parts = np.einsum("bhwn,bhwc->bnc", w, arr)
    return l2_normalize(parts.reshape(len(arr), -1))


def pool(fmap: np.ndarray, method: str, gem_p: float = 3.0, rmac_levels: int = 3, channels=None) -> np.ndarray:
    """Pool a batch with the named method. A ``(B, D)`` input is a vector already: it is only
    L2-normalised (models whose output is a dense layer, such as VGG16 fc2)."""
    arr = np.asarray(fmap, dtype=np.float32)
    if arr.ndim == 2:
        return l2_normalize(arr)
    if method == "gap":
        return gap(arr)
    if method == "mac":
        return mac(arr)
    if method == "gem":
        return gem(arr, gem_p)
    if method == "crow":
        return crow(arr)
    if method == "rmac":
        return rmac(arr, rmac_levels)
    if method == "pwa":
        if channels is None or not len(channels):
            raise ValueError("extract.pooling=pwa needs its fitted part channels")
        return pwa(arr, channels)
    raise ValueError(f"extract.pooling: unknown pooling {method!r}")

"""PCA-whitening and mean-threshold binary codes, in plain numpy.

PCA-whitening (Jégou & Chum 2012) is learned on a sample of the collection's own
descriptors: centre, rotate onto the principal axes, scale each axis by
``1/sqrt(eigenvalue)``, optionally keep the first ``dim`` axes, and L2-normalise again.

Binary codes threshold each dimension at the collection mean (``x > mean``), the
unsupervised variant used as a baseline for learned hashing; bits are packed with
``numpy.packbits`` (big-endian bit order within each byte).
"""

from __future__ import annotations

import io

import numpy as np

from cbir_lib.features.pooling import l2_normalize


class Whitening:
    def __init__(self, mean: np.ndarray, projection: np.ndarray, eigenvalues: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.projection = np.asarray(projection, dtype=np.float64)  # (dim_out, dim_in)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)

    @property
    def dim_in(self) -> int:
        return self.projection.shape[1]

    @property
    def dim_out(self) -> int:
        return self.projection.shape[0]

    @classmethod
    def fit(cls, x: np.ndarray, dim: int | None = None, shrinkage: float = 1e-5) -> "Whitening":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"whitening needs a (n >= 2, d) sample, got shape {x.shape}")
        n, d = x.shape
        # The sample's covariance has rank <= n - 1; whitening beyond it would scale noise.
        max_dim = min(d, n - 1)
        dim = min(dim or max_dim, max_dim)
        mean = x.mean(axis=0)
        xc = x - mean
        if n <= d:
            # Fewer samples than dimensions (PWA's parts x channels, a small sample): the
            # n x n Gram matrix has the covariance's nonzero eigenvalues, and its eigenvectors
            # map onto the covariance's through xc.T. O(n^2 d) time and n^2 memory instead of a
            # d x d covariance (20,480-d PWA: 3.4 GB) and its O(d^3) eigendecomposition. The
            # axes are the covariance route's up to sign, which no cosine sees (tested).
            eigval, u = np.linalg.eigh(xc @ xc.T / (n - 1))
            order = np.argsort(eigval)[::-1][:dim]
            eigval, u = eigval[order], u[:, order]
            keep = eigval > 1e-12 * max(float(eigval.max()), 1e-300)  # a sample of rank below n - 1
            eigval, u = eigval[keep], u[:, keep]
            eigvec = xc.T @ u / np.sqrt(eigval * (n - 1))
        else:
            eigval, eigvec = np.linalg.eigh(np.cov(xc, rowvar=False))
            order = np.argsort(eigval)[::-1][:dim]
            eigval, eigvec = eigval[order], eigvec[:, order]
        # A small ridge keeps near-zero eigenvalues from exploding noise directions.
        scale = 1.0 / np.sqrt(eigval + shrinkage * max(eigval.max(), 1e-12))
        return cls(mean, (eigvec * scale).T, eigval)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"whitening expects shape (n, {self.dim_in}), got {x.shape}")
        return l2_normalize((x - self.mean) @ self.projection.T)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Whitening":
        with np.load(io.BytesIO(data)) as z:
            return cls(z["mean"], z["projection"], z["eigenvalues"])


def mean_threshold_bits(x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Packed codes ``(n, ceil(d / 8))`` uint8 with bit ``j`` set where ``x[:, j] > thresholds[j]``."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != len(thresholds):
        raise ValueError(f"expected shape (n, {len(thresholds)}), got {x.shape}")
    return np.packbits(x > thresholds, axis=1)

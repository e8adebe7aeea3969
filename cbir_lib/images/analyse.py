"""Per-file analysis for the images table: ids, checksums, header facts, perceptual hashes.

Pure functions on bytes; the Spark adapter in :mod:`cbir_lib.images.run` only maps
them over partitions.

Perceptual hashes come from ``imagehash`` (aHash, dHash, pHash, 8x8 = 64 bits each).
They are stored as signed 64-bit integers: the hash's bits in row-major order, first
bit most significant, reinterpreted as two's complement, so ``bit_count(a ^ b)`` in SQL
is their Hamming distance. JPEGs are decoded at reduced DCT scale for hashing (at least
``hash_decode_side`` pixels on the short side); every hash resizes to 32 px or less
anyway, and the scale is fixed, so hashes are stable across runs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import imagehash
import numpy as np

from cbir_lib.images.decode import decode_pil

STATUS_OK = "ok"
STATUS_FAILED = "failed"


def image_id_for(path: str) -> int:
    """Stable signed 64-bit id of a file: the first 8 bytes of sha256 of its URI."""
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big", signed=True)


def hash_to_int64(h: imagehash.ImageHash) -> int:
    bits = np.asarray(h.hash, dtype=bool).ravel()
    if bits.size != 64:
        raise ValueError(f"expected a 64-bit hash, got {bits.size} bits")
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= (1 << 63) else value


def analyse(path: str, content: bytes | None, max_pixels: int, hash_decode_side: int) -> dict[str, Any]:
    """Everything the images table records about one file; never raises for bad input."""
    data = content if content is not None else b""
    row: dict[str, Any] = {
        "image_id": image_id_for(path),
        "path": path,
        "size_bytes": len(data),
        "content_sha256": hashlib.sha256(data).hexdigest(),
        "width": None,
        "height": None,
        "format": None,
        "mode": None,
        "n_frames": None,
        "ahash": None,
        "dhash": None,
        "phash": None,
        "status": STATUS_FAILED,
        "error": None,
    }
    decoded, err = decode_pil(data, max_pixels=max_pixels, min_side=hash_decode_side)
    if err:
        row["error"] = err
        return row
    img, info = decoded
    row.update(width=info.width, height=info.height, format=info.format, mode=info.mode, n_frames=info.n_frames)
    try:
        row["ahash"] = hash_to_int64(imagehash.average_hash(img))
        row["dhash"] = hash_to_int64(imagehash.dhash(img))
        row["phash"] = hash_to_int64(imagehash.phash(img))
    except MemoryError:  # the worker's state, not the file's: the task fails and is retried
        raise
    except Exception as exc:  # noqa: BLE001 - a hashing failure is a property of the file
        row["error"] = f"hash_error: {type(exc).__name__}: {exc}"
        return row
    row["status"] = STATUS_OK
    return row

"""The copy-verification core on real photos: a photo against its edited copies, and against
other photos of the same kind (clothing-small), and the caption shared by different photos."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import CLOTHING, need_shared
from PIL import Image

from cbir_lib.dedup.signature import decode_gray
from cbir_lib.dedup.verify import verify
from cbir_lib.sample import _transform

MIN_INLIERS, MIN_AGREEMENT = 15, 0.8  # dedup.min_inliers, dedup.min_agreement


def _photos(cls: str, n: int) -> list[Path]:
    need_shared()
    return sorted((CLOTHING / "train" / cls).glob("*.jpg"))[:n]


def _g(data: bytes):
    return decode_gray(data, 512)


def _passes(v) -> bool:
    return v.inliers >= MIN_INLIERS and v.agreement >= MIN_AGREEMENT


@pytest.mark.parametrize("kind", ["crop", "flip", "rotate", "rescale", "jpeg_q20", "brighten", "overlay_text"])
def test_edited_copies_pass(kind):
    for path in _photos("shoes", 2) + _photos("dress", 1):
        with Image.open(path) as img:
            img.load()
            v = verify(_g(path.read_bytes()), _g(_transform(img, kind)))
        assert _passes(v), (path.name, v)
        assert v.mirrored == (kind == "flip")


def test_other_photos_of_the_same_kind_fail():
    shoes = [_g(p.read_bytes()) for p in _photos("shoes", 4)]
    for i in range(len(shoes)):
        for j in range(i + 1, len(shoes)):
            v = verify(shoes[i], shoes[j])
            assert not _passes(v), (i, j, v)


def test_a_shared_caption_is_not_a_copy():
    """Two different photos with the same banner: many inliers (the text), but the rest of
    the frame disagrees."""
    a, b = _photos("shoes", 2)
    with Image.open(a) as ia, Image.open(b) as ib:
        ia.load()
        ib.load()
        v = verify(_g(_transform(ia, "overlay_text")), _g(_transform(ib, "overlay_text")))
    assert v.inliers >= MIN_INLIERS and v.agreement < MIN_AGREEMENT, v


def test_decode_bounds_the_size_and_refuses_junk():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1200, 3), np.uint8)).save(buf, "JPEG")
    assert max(decode_gray(buf.getvalue(), 256).shape) == 256
    assert decode_gray(b"not an image", 512) is None and decode_gray(b"", 512) is None


def test_verdicts_are_deterministic():
    a, b = (_g(p.read_bytes()) for p in _photos("dress", 2))
    with Image.open(_photos("dress", 1)[0]) as img:
        img.load()
        c = _g(_transform(img, "rotate"))
    assert verify(a, c) == verify(a, c) and verify(a, b) == verify(a, b)

"""Decoding: working memory bounded for a 100-megapixel 32-bit TIFF, memory errors retryable,
Pillow's own guard left on for the rest of the process."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from cbir_lib.images import decode


@pytest.mark.slow
def test_a_100_megapixel_32_bit_tiff_decodes_in_bounded_memory():
    img = Image.new("I", (10_000, 10_000), 1000)
    img.paste(70_000, (0, 0, 5_000, 10_000))
    buf = io.BytesIO()
    img.save(buf, format="TIFF", compression="tiff_deflate")
    del img
    data = buf.getvalue()
    tracemalloc.start()
    try:
        out, err = decode.decode_pil(data, max_pixels=150_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err is None
    rgb, info = out
    assert info.mode == "I" and rgb.size == (10_000, 10_000) and rgb.mode == "RGB"
    px = np.asarray(rgb.crop((4_990, 0, 5_010, 1)))[0, :, 0]
    assert px[0] == 255 and px[-1] == int(1000 * 255 / 65535)  # the same scaling as before
    # numpy working memory: the 8-bit plane (100 MB) and one block, not float64 copies (2-3 GB).
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_a_memory_error_is_not_a_permanent_row(monkeypatch):
    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(decode.Image, "open", boom)
    with pytest.raises(MemoryError):
        decode.decode_pil(b"\xff\xd8\xff" + b"0" * 100)


def _png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_pillows_guard_stays_on_and_a_bomb_is_a_too_large_row():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0
    out, err = decode.decode_pil(_png_header(20_000, 20_000), max_pixels=10**12)
    assert out is None and err.startswith("too_large: ") and "decompression-bomb guard" in err
    out, err = decode.decode_pil(_png_header(12_000, 12_000))  # 144M pixels > max_pixels 100M: our own limit
    assert out is None and err.startswith("too_large: 12000x12000")

import numpy as np
import pytest
from conftest import make_odd_files

from cbir_lib.images.decode import decode_for_model, decode_pil, probe

ODD = make_odd_files()


@pytest.mark.parametrize("name", sorted(ODD))
def test_every_odd_file_is_data_not_a_crash(name):
    data, status, expect = ODD[name]
    arr, err = decode_for_model(data, 32)
    if status == "failed":
        assert arr is None
        assert err.split(":")[0] == expect, err
    else:
        assert err is None
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
        decoded, _ = decode_pil(data)
        assert decoded[1].mode == expect and decoded[0].mode == "RGB"


def test_exif_rotation_is_honoured():
    data = ODD["exif_rotated.jpg"][0]
    (img, info), err = decode_pil(data)
    assert err is None
    # stored 80 wide x 60 high; orientation 6 displays it 60 wide x 80 high
    assert img.size == (60, 80) and (info.width, info.height) == (60, 80)
    hdr, _ = probe(data)
    assert (hdr.width, hdr.height) == (60, 80)


def test_alpha_is_composited_on_white():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(buf, format="PNG")
    (img, _), _ = decode_pil(buf.getvalue())
    assert img.getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_range():
    import io

    from PIL import Image

    ramp = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    (img, _), _ = decode_pil(buf.getvalue())
    px = np.asarray(img)[..., 0]
    assert px.min() == 0 and px.max() == (99 * 600) >> 8  # scaled, not clipped to 255


def test_animated_uses_first_frame():
    (img, info), _ = decode_pil(ODD["animated.gif"][0])
    assert info.n_frames == 3
    assert np.asarray(img).max() == 0  # first frame is black


def test_reduced_jpeg_decode_keeps_original_size():
    import io

    from PIL import Image

    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (1600, 1200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    (img, info), _ = decode_pil(buf.getvalue(), min_side=224)
    assert (info.width, info.height) == (1200, 1600)
    assert 224 <= min(img.size) < 600  # decoded at 1/4 scale, not full size


def test_max_pixels_is_enforced():
    _, err = decode_for_model(ODD["good.jpg"][0], 32, max_pixels=100)
    assert err.startswith("too_large")


@pytest.mark.parametrize("name", sorted(ODD))
def test_simplejpeg_gives_the_same_status_rows_as_pillow(name):
    """The libjpeg-turbo decoder takes plain JPEGs only; every other file, and every JPEG it
    refuses (CMYK, rotated, truncated), gets Pillow's verdict, reason included."""
    data = ODD[name][0]
    for resize in ("center_crop", "squash"):
        a, err_a = decode_for_model(data, 32, resize)
        b, err_b = decode_for_model(data, 32, resize, decoder="simplejpeg")
        assert err_a == err_b and (a is None) == (b is None)
        if a is not None:
            assert b.shape == a.shape and b.dtype == np.uint8
    if name in ("exif_rotated.jpg", "cmyk.jpg") or not name.endswith(".jpg"):  # Pillow's path, pixel for pixel
        np.testing.assert_array_equal(
            *(
                decode_for_model(data, 32, decoder=d)[0] if decode_for_model(data, 32)[0] is not None else np.zeros(1)
                for d in ("pillow", "simplejpeg")
            )
        )


def test_simplejpeg_on_real_photos_is_close_to_pillow():
    from conftest import CLOTHING, need_shared

    need_shared()
    files = sorted((CLOTHING / "train").rglob("*.jpg"))[:20]
    for f in files:
        data = f.read_bytes()
        a, _ = decode_for_model(data, 224, "center_crop")
        b, err = decode_for_model(data, 224, "center_crop", decoder="simplejpeg")
        # libjpeg-turbo scales in the DCT by M/8 (here 5/8 of 400 x 533), Pillow's draft only
        # by 1/2^n (here not at all): the same picture, resampled a little differently.
        assert err is None and np.abs(a.astype(int) - b.astype(int)).mean() < 8
    truncated = files[0].read_bytes()[:5000]
    assert decode_for_model(truncated, 224, decoder="simplejpeg") == (None, decode_for_model(truncated, 224)[1])

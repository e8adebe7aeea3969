"""The colour-histogram baseline: known colours, the grid, and Pearson correlation as cosine."""

import numpy as np
import pytest

from cbir_lib.config import ConfigError, ExtractConfig, load
from cbir_lib.models import color_hist


@pytest.fixture(scope="module")
def model():
    return color_hist.build((8, 12, 3), 1, 16)


def _two_colours():
    img = np.zeros((1, 16, 16, 3), np.float32)
    img[:, :, :8] = (255, 0, 0)  # red: hue 0, saturation 1, value 1
    img[:, :, 8:] = (0, 0, 255)  # blue: hue 2/3
    return img


def test_histogram_of_known_colours(model):
    out = np.asarray(model(_two_colours()))[0]
    assert out.shape == (288,)
    h = out + 1 / 288  # the model centres: mean 1/288 of an L1-normalised histogram
    red = (0 * 12 + 11) * 3 + 2
    blue = (5 * 12 + 11) * 3 + 2  # floor(2/3 * 8) = 5
    want = np.zeros(288)
    want[[red, blue]] = 0.5
    np.testing.assert_allclose(h, want, atol=1e-6)


def test_the_grid_counts_each_quarter_apart():
    out = np.asarray(color_hist.build((8, 12, 3), 2, 16)(_two_colours()))[0]
    assert out.shape == (4 * 288,)
    h = (out + 1 / 288).reshape(4, 288)  # cells: top-left, top-right, bottom-left, bottom-right
    red, blue = 35, 5 * 36 + 35
    for cell, colour in ((0, red), (1, blue), (2, red), (3, blue)):
        assert h[cell, colour] == pytest.approx(1.0) and h[cell].sum() == pytest.approx(1.0)


def test_cosine_of_the_embeddings_is_pearson_correlation(tmp_path):
    from cbir_lib.features.embedder import Embedder, EmbedSpec
    from cbir_lib.models.backbones import resolve_artifact

    art = resolve_artifact(ExtractConfig(model="color_hist", model_cache=str(tmp_path)))
    assert art.image_size == 128 and art.local_path.endswith(".keras")
    assert resolve_artifact(ExtractConfig(model="color_hist", model_cache=str(tmp_path / "other"))).sha256 == art.sha256
    emb = Embedder(EmbedSpec(artifact=art), art.local_path)
    rng = np.random.default_rng(0)
    imgs = (rng.random((3, 128, 128, 3)) ** np.array([1.0, 3.0, 0.5]) * 255).astype(np.uint8)
    imgs[1] = np.clip(imgs[0].astype(int) + 30, 0, 255)  # a brighter copy of the first
    imgs[2] = imgs[0][..., [2, 0, 1]]  # the same pixels with the hues rotated
    v = emb.embed(imgs)
    raw = np.asarray(color_hist.build((8, 12, 3), 1, 128)(imgs.astype(np.float32))) + 1 / 288
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert float(v[a] @ v[b]) == pytest.approx(np.corrcoef(raw[a], raw[b])[0, 1], abs=2e-4)  # float32 counts
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])


def test_bad_bins_name_the_field():
    with pytest.raises(ConfigError, match="extract.hist_bins"):
        load(None, ["extract.model=color_hist", "extract.hist_bins=8x12"])
    with pytest.raises(ConfigError, match="extract.hist_grid"):
        load(None, ["extract.hist_grid=9"])

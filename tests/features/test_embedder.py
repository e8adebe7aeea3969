"""The embedding core on arrays: test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.config import ExtractConfig
from cbir_lib.features.embedder import Embedder, EmbedSpec
from cbir_lib.features.pooling import l2_normalize
from cbir_lib.models.backbones import resolve_artifact


@pytest.fixture(scope="module")
def embedders(model_cache):
    artifact = resolve_artifact(ExtractConfig(model_cache=model_cache, image_size=128))
    make = lambda tta: Embedder(EmbedSpec(artifact=artifact, pooling="rmac", tta=tta), artifact.local_path)  # noqa: E731
    return make("none"), make("flip")


def test_flip_sums_both_views_and_is_mirror_invariant(embedders):
    plain, flip = embedders
    images = np.random.default_rng(0).integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
    mirrored = images[:, :, ::-1].copy()
    got = flip.embed(images)
    np.testing.assert_allclose(got, l2_normalize(plain.embed(images) + plain.embed(mirrored)), atol=1e-5)
    np.testing.assert_allclose(flip.embed(mirrored), got, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Without TTA a mirrored image is a different descriptor (else the test proves nothing).
    assert (np.sum(plain.embed(images) * plain.embed(mirrored), axis=1) < 0.999).all()


def test_one_spec_builder_carries_every_embedding_setting_of_the_config():
    """extract and cbir query build their EmbedSpec through EmbedSpec.from_config: a query
    image is embedded as the collection was (query once dropped mixed_precision)."""
    import dataclasses

    e = ExtractConfig(
        pooling="gem",
        gem_p=4.0,
        rmac_levels=2,
        resize="pad",
        tta="flip",
        batch_size=8,
        mixed_precision=True,
        device="gpu",
        decode_threads=3,
        decoder="simplejpeg",
    )
    spec = EmbedSpec.from_config(e, "artifact", 1234, [5, 6])
    assert dataclasses.asdict(spec) == {
        **dataclasses.asdict(EmbedSpec(artifact="artifact")),
        "pooling": "gem",
        "gem_p": 4.0,
        "rmac_levels": 2,
        "resize": "pad",
        "tta": "flip",
        "batch_size": 8,
        "mixed_precision": True,
        "device": "gpu",
        "decode_threads": 3,
        "max_pixels": 1234,
        "decoder": "simplejpeg",
        "pwa_channels": (5, 6),
    }
    assert EmbedSpec.from_config(e, "artifact", 1234, device="cpu").device == "cpu"
    import inspect

    from cbir_lib import query

    assert "EmbedSpec(" not in inspect.getsource(query).replace("EmbedSpec.from_config(", "")  # query builds none by hand

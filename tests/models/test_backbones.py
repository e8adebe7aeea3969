import numpy as np
import pytest

from cbir_lib.config import ExtractConfig
from cbir_lib.models.backbones import KERAS_APPS, resolve_artifact


@pytest.mark.parametrize("name", sorted(KERAS_APPS))
def test_missing_keras_weights_name_the_file(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        resolve_artifact(ExtractConfig(model=name))
    msg = str(err.value)
    assert KERAS_APPS[name][4] in msg and str(tmp_path) in msg and "extract.model_path" in msg


def test_keras_app_from_an_explicit_weights_file(tmp_path):
    """A weights file given by path is loaded into the app and its conv map pooled."""
    import keras

    from cbir_lib.features.embedder import Embedder, EmbedSpec

    app = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3))
    weights = tmp_path / "mnv2.weights.h5"
    app.save_weights(str(weights))
    artifact = resolve_artifact(ExtractConfig(model="mobilenetv2", model_path=str(weights), image_size=96))
    emb = Embedder(EmbedSpec(artifact=artifact, pooling="gem"), str(weights))
    out = emb.embed(np.random.default_rng(0).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8))
    assert out.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_custom_model_with_named_output_layer(tmp_path):
    import keras

    from cbir_lib.features.embedder import Embedder, EmbedSpec

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(4, name="emb")(x)
    path = tmp_path / "user.keras"
    keras.Model(inp, keras.layers.Dense(2, name="head")(out)).save(str(path))

    artifact = resolve_artifact(ExtractConfig(model="custom", model_path=str(path), output_layer="emb"))
    assert artifact.image_size == 32
    emb = Embedder(EmbedSpec(artifact=artifact), str(path))
    assert emb.embed(np.zeros((3, 32, 32, 3), np.uint8)).shape == (3, 4)

    bad = resolve_artifact(ExtractConfig(model="custom", model_path=str(path), output_layer="nope"))
    with pytest.raises(ValueError, match="extract.output_layer"):
        Embedder(EmbedSpec(artifact=bad), str(path))


def test_lite_mixed_precision_agrees_with_float32(model_cache):
    from cbir_lib.features.embedder import Embedder, EmbedSpec

    cfg = ExtractConfig(model_cache=model_cache, image_size=128)
    artifact = resolve_artifact(cfg)
    images = np.random.default_rng(0).integers(0, 255, (2, 128, 128, 3), dtype=np.uint8)
    full = Embedder(EmbedSpec(artifact=artifact), artifact.local_path).embed(images)
    half = Embedder(EmbedSpec(artifact=artifact, mixed_precision=True), artifact.local_path).embed(images)
    assert full.shape == (2, 1280)
    assert (np.sum(full * half, axis=1) > 0.99).all()


def test_the_config_knows_exactly_the_models_the_registry_builds():
    from cbir_lib.config import BUILTIN_MODELS
    from cbir_lib.models.backbones import builtin_models

    assert sorted(BUILTIN_MODELS) == sorted(builtin_models())

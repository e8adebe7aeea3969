"""Backbones: where a model's file comes from (driver) and how it is built (executor).

The driver resolves a :class:`ModelArtifact` (a local file, its checksum, the input
size) and ships the file with ``SparkContext.addFile``. Executors rebuild the model
from that file with :func:`build_feature_model`; nothing model-shaped is ever pickled
from the driver.

Every feature model takes 0..255 RGB float input; each backbone's own preprocessing is
applied inside :func:`build_feature_model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cbir_lib.config import ExtractConfig
from cbir_lib.models import color_hist, efficientnet_lite

# keras.applications: (constructor, feature layer, preprocessing mode, native size, weight files)
KERAS_APPS = {
    "vgg16": ("VGG16", "block5_conv3", "caffe", 224, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16-fc2": ("VGG16", "fc2", "caffe", 224, "vgg16_weights_tf_dim_ordering_tf_kernels.h5"),
    "resnet50": ("ResNet50", "conv5_block3_out", "caffe", 224, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "mobilenetv2": ("MobileNetV2", "out_relu", "tf", 224, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    "inceptionv3": ("InceptionV3", "mixed10", "tf", 299, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class ModelArtifact:
    """What an executor needs to rebuild the model: a shipped file and how to read it."""

    model: str  # builtin name or "custom"
    file_name: str  # basename under SparkFiles / local path
    local_path: str
    sha256: str
    image_size: int
    output_layer: str | None


def builtin_models() -> tuple[str, ...]:
    """The models this package builds, by ``extract.model`` name: the registry. (config.py
    keeps a copy, ``BUILTIN_MODELS``, to refuse an unknown name when the config is loaded,
    below this layer; ``tests/models/test_backbones.py`` holds the two equal.)"""
    return (*efficientnet_lite.VARIANTS, *KERAS_APPS, color_hist.NAME)


def keras_cache_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models")


def resolve_artifact(cfg: ExtractConfig) -> ModelArtifact:
    """Driver side: find or convert the model file; errors name the file expected."""
    if cfg.model.startswith("efficientnet-lite"):
        path = cfg.model_path or efficientnet_lite.converted_model(cfg.model, cfg.model_cache_dir)
        size = cfg.image_size or efficientnet_lite.VARIANTS[cfg.model][2]
        layer = None
    elif cfg.model == color_hist.NAME:
        import hashlib

        size = cfg.image_size or color_hist.DEFAULT_SIZE
        bins = color_hist.parse_bins(cfg.hist_bins)
        path = color_hist.model_file(bins, cfg.hist_grid, size, cfg.model_cache_dir)
        # The descriptor is defined by its settings, not by the bytes of a saved file.
        digest = hashlib.sha256(f"{color_hist.NAME} v1 bins={bins} grid={cfg.hist_grid} size={size}".encode()).hexdigest()
        return ModelArtifact(cfg.model, os.path.basename(path), path, digest, size, None)
    elif cfg.model in KERAS_APPS:
        _, layer, _, native, weights = KERAS_APPS[cfg.model]
        path = cfg.model_path or os.path.join(keras_cache_dir(), weights)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"extract.model={cfg.model}: ImageNet weights not found; expected {path} "
                f"(Keras's cache file {weights}), or give the file with extract.model_path"
            )
        size = 224 if cfg.model == "vgg16-fc2" else (cfg.image_size or native)
    else:  # custom
        path = cfg.model_path
        if not os.path.exists(path):
            raise FileNotFoundError(f"extract.model_path: {path} does not exist")
        layer = cfg.output_layer
        size = cfg.image_size or _custom_input_size(path)
    return ModelArtifact(cfg.model, os.path.basename(path.rstrip("/")), path, _checksum(path), size, layer)


def _checksum(path: str) -> str:
    if os.path.isdir(path):  # SavedModel: hash every file, in a stable order
        import hashlib

        h = hashlib.sha256()
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode())
                h.update(efficientnet_lite.sha256_file(full).encode())
        return h.hexdigest()
    return efficientnet_lite.sha256_file(path)


def _custom_input_size(path: str) -> int:
    model = _load_user_model(path)
    shape = getattr(model, "input_shape", None)
    if not shape or shape[1] is None:
        raise ValueError(f"extract.image_size: {path} has no fixed input size; set extract.image_size")
    return int(shape[1])


def _load_user_model(path: str):
    import keras

    return keras.models.load_model(path, compile=False)


def _with_policy(model, policy: str):
    """Rebuild a functional model with every layer under a dtype policy (mixed precision)."""
    import keras

    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer":
            layer["config"]["dtype"] = policy
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def preprocess_mode(artifact: ModelArtifact) -> str:
    """How 0..255 RGB input must be transformed before the model: caffe, tf or none."""
    if artifact.model in KERAS_APPS:
        return KERAS_APPS[artifact.model][2]
    return "none"  # Lite has its own Rescaling layer; user models take 0..255 RGB


def preprocess(x, mode: str):
    """Apply a backbone's input preprocessing to a float tensor of 0..255 RGB."""
    import tensorflow as tf

    if mode == "caffe":
        x = x[..., ::-1]
        return x - tf.constant(CAFFE_MEAN_BGR, dtype=x.dtype)
    if mode == "tf":
        return x / 127.5 - 1.0
    return x


def build_feature_model(artifact: ModelArtifact, path: str, mixed_precision: bool = False):
    """Executor side: a Keras model from preprocessed input to the feature output.

    Feed it ``preprocess(x, preprocess_mode(artifact))``. The output is a feature map
    ``(B, h, w, C)`` for convolutional backbones, or a vector ``(B, D)`` for dense outputs
    (VGG16 fc2, user layers).
    """
    import keras

    size = artifact.image_size
    if artifact.model == color_hist.NAME:
        color_hist.layer_class()  # registered before the file is read
        return keras.models.load_model(path, compile=False)  # counting: no reduced precision
    if artifact.model.startswith("efficientnet-lite"):
        full = keras.models.load_model(path, compile=False)
        feature_model = keras.Model(full.input, full.get_layer(efficientnet_lite.FEATURE_LAYER).output)
        if size != feature_model.input_shape[1]:
            # Fully convolutional: rebuild at the requested size with the same weights.
            config = feature_model.get_config()
            config["layers"][0]["config"]["batch_shape"] = [None, size, size, 3]
            resized = keras.Model.from_config(config)
            resized.set_weights(feature_model.get_weights())
            feature_model = resized
    elif artifact.model in KERAS_APPS:
        ctor, layer, _, _, _ = KERAS_APPS[artifact.model]
        include_top = artifact.model == "vgg16-fc2"
        app = getattr(keras.applications, ctor)(include_top=include_top, weights=None, input_shape=(size, size, 3))
        app.load_weights(path)
        feature_model = keras.Model(app.input, app.get_layer(layer).output)
    else:
        user = _load_user_model(path)
        try:
            out = user.get_layer(artifact.output_layer).output
        except ValueError as exc:
            names = [layer.name for layer in user.layers]
            raise ValueError(f"extract.output_layer: {artifact.output_layer!r} is not a layer of {path}; layers: {names}") from exc
        feature_model = keras.Model(user.input, out)
    if mixed_precision:
        feature_model = _with_policy(feature_model, "mixed_float16")
    return feature_model

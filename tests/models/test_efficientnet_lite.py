"""The Lite0/1/2 ports: real ImageNet weights, converted without torch, must classify real photos."""

import numpy as np
import pytest

from cbir_lib.models import efficientnet_lite as el
from cbir_lib.models.torch_legacy import LegacyCheckpointError, load_legacy_state_dict

CLASSES = (el.__file__.rsplit("/", 1)[0]) + "/imagenet_classes.txt"


VARIANTS = sorted(el.VARIANTS)  # every variant the lock installs


@pytest.fixture(scope="module")
def state():
    return load_legacy_state_dict(el.torch_checkpoint_path("efficientnet-lite0"))


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def variant_state(variant):
    return load_legacy_state_dict(el.torch_checkpoint_path(variant))


@pytest.fixture(scope="module")
def converted(variant, model_cache):
    import keras

    return keras.models.load_model(el.converted_model(variant, model_cache), compile=False)


def _photo(name: str, size: int = 224) -> np.ndarray:
    import skimage.data
    from PIL import Image

    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR), np.float32)


def test_legacy_reader_reads_every_tensor(state):
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.running_var"].min() >= 0 and state["_bn0.running_var"].max() > 1


def test_legacy_reader_refuses_other_files(tmp_path):
    bad = tmp_path / "zip.pth"
    bad.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(LegacyCheckpointError, match="zip-format"):
        load_legacy_state_dict(str(bad))


def test_block_structure_is_lite0(state):
    specs = el.block_specs(state)
    assert len(specs) == 16
    assert [s.stride for s in specs if s.stride == 2] == [2, 2, 2, 2]
    assert [s.kernel for s in specs].count(5) == 9
    assert sum(s.residual for s in specs) == 9


def test_class_names_are_kept_in_the_project():
    names = open(CLASSES).read().splitlines()
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"


# Published Lite architectures: blocks, and the input size each was trained at.
# Lite1 and Lite2 scale the depth by 1.1 and 1.2 (ceil per stage, first and last stage kept
# at one block): 1 + 3 + 3 + 4 + 4 + 5 + 1 = 21 blocks both.
EXPECTED = {"efficientnet-lite0": (16, 224), "efficientnet-lite1": (21, 240), "efficientnet-lite2": (21, 260)}


def test_every_variant_is_installed_and_shaped_as_published(variant, variant_state, converted):
    blocks, size = EXPECTED[variant]
    assert len(el.block_specs(variant_state)) == blocks
    assert el.VARIANTS[variant][2] == size
    assert tuple(converted.input_shape[1:]) == (size, size, 3)
    assert converted.get_layer(el.FEATURE_LAYER).output.shape[-1] == 1280


@pytest.mark.parametrize("photo, expected", [("chelsea", {"tabby", "tiger cat", "Egyptian cat"}), ("coffee", {"espresso"})])
def test_port_recognises_real_photos(variant, converted, photo, expected):
    names = open(CLASSES).read().splitlines()
    size = el.VARIANTS[variant][2]
    logits = np.asarray(converted(_photo(photo, size)[None], training=False)["logits"])[0]
    top3 = {names[i] for i in np.argsort(-logits)[:3]}
    assert top3 & expected, (variant, top3)


def test_conversion_is_cached(model_cache):
    import os

    path = el.converted_model("efficientnet-lite0", model_cache)
    mtime = os.path.getmtime(path)
    assert el.converted_model("efficientnet-lite0", model_cache) == path
    assert os.path.getmtime(path) == mtime


@pytest.mark.dev
def test_logits_match_torch(variant, variant_state, converted):
    """Dev-only: the Keras port against a torch forward pass of the same checkpoint."""
    torch = pytest.importorskip("torch", reason="torch is a dev-only tool: pip install torch==2.13.0")
    F = torch.nn.functional
    state = variant_state
    size = el.VARIANTS[variant][2]
    sd = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}

    def same_pad(x, k, s):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-3)

    photos = np.stack([_photo("chelsea", size), _photo("coffee", size)])
    x = torch.from_numpy(photos).permute(0, 3, 1, 2)
    x = (x - 127.0) / 128.0
    x = F.relu6(bn(F.conv2d(same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), "_bn0"))
    for s in el.block_specs(state):
        t = f"_blocks.{s.index}."
        inp = x
        if s.expanded_ch != s.in_ch:
            x = F.relu6(bn(F.conv2d(x, sd[t + "_expand_conv.weight"]), t + "_bn0"))
        x = F.conv2d(same_pad(x, s.kernel, s.stride), sd[t + "_depthwise_conv.weight"], stride=s.stride, groups=s.expanded_ch)
        x = F.relu6(bn(x, t + "_bn1"))
        x = bn(F.conv2d(x, sd[t + "_project_conv.weight"]), t + "_bn2")
        if s.residual:
            x = x + inp
    x = F.relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1"))
    ref = F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"]).numpy()
    ours = np.asarray(converted(photos, training=False)["logits"])
    print(variant, "max |keras - torch| logit difference:", float(np.abs(ours - ref).max()))
    np.testing.assert_allclose(ours, ref, atol=1e-4)

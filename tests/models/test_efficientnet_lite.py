"""The Lite0 port: real ImageNet weights, converted without torch, must classify real photos."""

import numpy as np
import pytest

from cbir_lib.models import efficientnet_lite as el
from cbir_lib.models.torch_legacy import LegacyCheckpointError, load_legacy_state_dict

CLASSES = (el.__file__.rsplit("/", 1)[0]) + "/imagenet_classes.txt"


@pytest.fixture(scope="module")
def state():
    return load_legacy_state_dict(el.torch_checkpoint_path("efficientnet-lite0"))


@pytest.fixture(scope="module")
def lite0(model_cache):
    import keras

    return keras.models.load_model(el.converted_model("efficientnet-lite0", model_cache), compile=False)


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


@pytest.mark.parametrize("photo, expected", [("chelsea", {"tabby", "tiger cat", "Egyptian cat"}), ("coffee", {"espresso"})])
def test_port_recognises_real_photos(lite0, photo, expected):
    names = open(CLASSES).read().splitlines()
    logits = np.asarray(lite0(_photo(photo)[None], training=False)["logits"])[0]
    top3 = {names[i] for i in np.argsort(-logits)[:3]}
    assert top3 & expected, top3


def test_conversion_is_cached(model_cache):
    import os

    path = el.converted_model("efficientnet-lite0", model_cache)
    mtime = os.path.getmtime(path)
    assert el.converted_model("efficientnet-lite0", model_cache) == path
    assert os.path.getmtime(path) == mtime


@pytest.mark.dev
def test_logits_match_torch(state, lite0):
    """Dev-only: the Keras port against a torch forward pass of the same checkpoint."""
    torch = pytest.importorskip("torch", reason="torch is a dev-only tool: pip install torch==2.13.0")
    F = torch.nn.functional
    sd = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}

    def same_pad(x, k, s):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-3)

    x = torch.from_numpy(np.stack([_photo("chelsea"), _photo("coffee")])).permute(0, 3, 1, 2)
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
    ours = np.asarray(lite0(np.stack([_photo("chelsea"), _photo("coffee")]), training=False)["logits"])
    print("max |keras - torch| logit difference:", float(np.abs(ours - ref).max()))
    np.testing.assert_allclose(ours, ref, atol=1e-4)

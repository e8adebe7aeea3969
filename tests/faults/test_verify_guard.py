"""One pair that OpenCV cannot verify is that pair's "not verified" verdict, never the stage's failure."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from cbir_lib.dedup.run import _verify_partition
from cbir_lib.dedup.verify import prepare


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).resize((256, 192))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return prepare(buf.getvalue())


def test_a_pair_that_breaks_verification_gets_a_reason_and_the_others_their_verdicts():
    good = _photo(1)
    pdf = pd.DataFrame({"a": [1, 2, 3], "b": [10, 20, 30],
                        "pa": [good, b"\x89PNG broken payload", None], "pb": [good, good, good]})
    out = pd.concat(list(_verify_partition(500)(iter([pdf]))))
    assert out["a"].tolist() == [1, 2, 3]
    assert out["unverified"].iloc[0] is None and out["inliers"].iloc[0] > 15  # the same image verifies
    assert out["unverified"].iloc[1].startswith("verify_error: ") and out["inliers"].iloc[1] == 0
    assert out["unverified"].iloc[2].startswith("unreadable_image") and out["inliers"].iloc[2] == 0

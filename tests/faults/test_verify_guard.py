"""One pair that OpenCV cannot verify is that pair's "not verified" verdict, never the stage's failure."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from cbir_lib.dedup import signature as sig
from cbir_lib.dedup.run import SIGNATURE_COLUMNS, _verify_partition


def _signed(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).resize((256, 192))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return sig.encode(sig.signature(sig.decode_gray(buf.getvalue(), 512), 400))


def test_a_pair_that_breaks_verification_gets_a_reason_and_the_others_their_verdicts():
    good = _signed(1)
    broken = {**good, "thumb": b"\x89PNG broken payload"}
    missing = dict.fromkeys(SIGNATURE_COLUMNS)
    rows_a, rows_b = [good, broken, missing], [good, good, good]
    pdf = pd.DataFrame(
        {
            "a": [1, 2, 3],
            "b": [10, 20, 30],
            **{f"a_{c}": [r[c] for r in rows_a] for c in SIGNATURE_COLUMNS},
            **{f"b_{c}": [r[c] for r in rows_b] for c in SIGNATURE_COLUMNS},
        }
    )
    out = pd.concat(list(_verify_partition(15, 0.8, True)(iter([pdf]))))
    assert out["a"].tolist() == [1, 2, 3]
    assert out["unverified"].iloc[0] is None and out["inliers"].iloc[0] > 15  # the same image verifies
    assert out["unverified"].iloc[1].startswith("verify_error: ") and out["inliers"].iloc[1] == 0
    assert out["unverified"].iloc[2].startswith("unreadable_image") and out["inliers"].iloc[2] == 0

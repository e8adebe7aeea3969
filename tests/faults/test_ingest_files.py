"""Files that are too big or vanish mid-run: failed rows with a reason, nothing else lost."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from cbir_lib import config
from cbir_lib.common import tables
from cbir_lib.images.run import _read_partition, images_table_uri, run_ingest


def _jpeg(path, colour):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())


@pytest.mark.slow
def test_a_sparse_file_over_2gib_is_a_failed_row_decided_from_the_listing(spark, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _jpeg(src / "a.jpg", "red")
    _jpeg(src / "b.jpg", "blue")
    with open(src / "huge.tif", "wb") as fh:
        fh.truncate(3 * 2**30)  # sparse: 3 GiB listed, nothing stored
    cfg = config.load(None, [f"run.output_root={tmp_path / 'out'}", "run.run_id=r1"])
    m = run_ingest(spark, cfg, str(src))
    rows = {r.path.rsplit("/", 1)[-1]: r for r in tables.read_latest(spark, images_table_uri(spark, cfg)).collect()}
    assert set(rows) == {"a.jpg", "b.jpg", "huge.tif"}
    assert rows["a.jpg"].status == rows["b.jpg"].status == "ok"
    assert rows["huge.tif"].status == "failed" and rows["huge.tif"].error.startswith("file_too_large: 3221225472 bytes")
    assert m["counts"]["listed"] == 3


def test_a_file_gone_since_the_listing_is_a_missing_file_row(tmp_path):
    from cbir_lib.common import remote

    present = tmp_path / "here.jpg"
    _jpeg(present, "green")
    pdf = pd.DataFrame(
        {
            "path": [f"file:{present}", f"file:{tmp_path}/gone.jpg", f"file:{tmp_path}/big.jpg"],
            "modificationTime": [None] * 3,
            "size_bytes": [present.stat().st_size, 100, 10**9],
        }
    )
    out = pd.concat(list(_read_partition(remote.Files(), 10**6)(iter([pdf]))))
    assert out["read_error"].iloc[0] is None and len(out["content"].iloc[0]) == present.stat().st_size
    assert out["read_error"].iloc[1].startswith("missing_file") and out["content"].iloc[1] == b""
    assert out["read_error"].iloc[2].startswith("file_too_large") and out["content"].iloc[2] == b""

"""The evaluate stage on local[2] against numpy oracles, and its report in a real browser.

Embeddings are written directly (no TensorFlow) for small real JPEG files laid out as
``<split>/<class>/x.jpg``; neighbours come from the real index and neighbours stages.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import headless_browser
from PIL import Image

from cbir_lib import config
from cbir_lib.common import fs, tables
from cbir_lib.evaluate import metrics
from cbir_lib.evaluate.run import run_evaluate
from cbir_lib.index.run import run_build_index
from cbir_lib.neighbors.run import run_neighbors

pytestmark = pytest.mark.slow
EMB_DDL = "image_id long, path string, embedding array<float>, dim int, status string, error string, extract_run_id string"
CLASSES = ("boots", "caps", "socks")


@pytest.fixture(scope="module")
def collection(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, 16))
    rows, meta = [], []
    for split, per in (("train", 20), ("test", 6)):
        for c, cls in enumerate(CLASSES):
            d = root / "photos" / split / cls
            d.mkdir(parents=True)
            for j in range(per):
                p = d / f"{split}{j}.jpg"
                colour = tuple(int(v) for v in rng.integers(0, 255, 3))
                Image.new("RGB", (40, 30), colour).save(p)
                v = centres[c] + 1.1 * rng.normal(size=16)
                v /= np.linalg.norm(v)
                image_id = int(rng.integers(-(2**62), 2**62))
                rows.append((image_id, f"file:{p}", v.astype(np.float32).tolist(), 16, "ok", None, "e1"))
                meta.append((image_id, split, cls, v))
    rows.append((5, f"file:{root}/photos/train/boots/broken.jpg", None, None, "failed", "truncated", "e1"))
    tables.commit(
        spark, spark.createDataFrame(rows, EMB_DDL), fs.join(fs.qualify(spark, str(root)), "embeddings"), "e1", {"run_id": "e1", "dim": 16}
    )
    cfg = config.load(
        None, [f"run.output_root={root}", "neighbors.rerank=none", "neighbors.k=5", "index.n_cells=3", "run.keep_snapshots=10"]
    )
    run_build_index(spark, cfg)
    run_neighbors(spark, cfg)
    return root, meta


def _oracle(q, g, qlab, glab, qids, gids, k, skip_self=False, order=None):
    s = q @ g.T
    if skip_self:
        np.fill_diagonal(s, -np.inf)
    if order is None:
        order = np.lexsort((np.broadcast_to(gids, s.shape), -s), axis=1)
    if skip_self:
        order = order[:, :-1]
    rel = glab[order] == qlab[:, None]
    n_rel = np.array([(glab == lab).sum() - (1 if skip_self else 0) for lab in qlab])
    return metrics.per_query(rel, n_rel, k, full=True)


def test_neighbors_mode_matches_the_oracle(spark, collection):
    root, meta = collection
    m = run_evaluate(spark, config.load(None, [f"run.output_root={root}", "evaluate.report=false", "run.keep_snapshots=10"]))
    ids = np.array([r[0] for r in meta])
    x = np.stack([r[3] for r in meta]).astype(np.float32)
    lab = np.array([r[2] for r in meta])
    want = metrics.summarise(_oracle(x, x, lab, lab, ids, ids, 5, skip_self=True))
    got = m["metrics"]
    assert got["queries"] == len(meta) == want["queries"]
    for key in ("precision_at_k", "map_at_k", "recall_at_k", "mean_precision_at_k"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["map"] is None, "only the top-k is known in neighbours mode"
    summary = json.loads(open(os.path.join(m["output"].replace("file:", ""), "metrics.json")).read())
    assert set(summary["per_class"]) == set(CLASSES) and len(summary["precision_curve"]) == 5
    assert summary["precision_curve"][-1] == pytest.approx(want["precision_at_k"], abs=1e-6)
    assert "mean_precision_at_k" in summary["definitions"]
    per_class = spark.read.parquet(os.path.join(m["output"], "per_class")).toPandas()
    assert sorted(per_class.label) == sorted(CLASSES)


@pytest.mark.parametrize("rerank", ["none", "dba+alpha_qe", "dba+alpha_qe+k_reciprocal"])
def test_split_mode_matches_the_oracle(spark, collection, rerank):
    from cbir_lib.neighbors.kreciprocal import split_order
    from cbir_lib.neighbors.rerank import exact_rerank, split_mode

    root, meta = collection
    m = run_evaluate(
        spark,
        config.load(
            None,
            [
                f"run.output_root={root}",
                "evaluate.mode=split",
                "evaluate.report=false",
                f"neighbors.rerank={rerank}",
                "neighbors.rerank_n=4",
                "run.keep_snapshots=10",
                "neighbors.kr_k1=8",
                "neighbors.kr_k2=3",
                "neighbors.kr_depth=16",
            ],
        ),
    )
    tr = [r for r in meta if r[1] == "train"]
    te = [r for r in meta if r[1] == "test"]
    g = np.stack([r[3] for r in sorted(tr, key=lambda r: r[0])]).astype(np.float32)
    gids = np.array(sorted(r[0] for r in tr))
    glab = np.array([r[2] for r in sorted(tr, key=lambda r: r[0])])
    q = np.stack([r[3] for r in te]).astype(np.float32)
    q, g = exact_rerank(q, g, rerank, 4, 3.0)
    # k-reciprocal: the oracle's graph numbers the gallery first, then the queries, as ids
    order = split_order(q, g, 16, 8, 3, 0.3) if split_mode(rerank)[1] else None
    want = metrics.summarise(_oracle(q, g, np.array([r[2] for r in te]), glab, None, gids, 10, order=order))
    got = m["metrics"]
    assert got["queries"] == len(te) and m["gallery_size"] == len(tr)
    for key in ("precision_at_k", "map_at_k", "map", "recall_at_k"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key


def test_labels_csv_and_groups_and_bad_labels(spark, collection, tmp_path):
    root, meta = collection
    csv = tmp_path / "labels.csv"
    # relative paths resolved against evaluate.labels_base; labels renamed so they must come from the CSV
    lines = ["file,label"]
    for split in ("train", "test"):
        for cls in CLASSES:
            for f in sorted(os.listdir(root / "photos" / split / cls)):
                lines.append(f"{split}/{cls}/{f},{cls.upper()}")
    csv.write_text("\n".join(lines) + "\n")
    m = run_evaluate(
        spark,
        config.load(
            None,
            [
                f"run.output_root={root}",
                f"evaluate.labels={csv}",
                f"evaluate.labels_base={root}/photos",
                "evaluate.report=false",
                "run.keep_snapshots=10",
            ],
        ),
    )
    assert m["metrics"]["queries"] == len(meta)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,colour\nx.jpg,red\n")
    with pytest.raises(config.ConfigError, match="evaluate.labels"):
        run_evaluate(spark, config.load(None, [f"run.output_root={root}", f"evaluate.labels={bad}"]))
    with pytest.raises(config.ConfigError, match="evaluate.labels"):
        run_evaluate(spark, config.load(None, [f"run.output_root={root}", f"evaluate.labels={tmp_path}/absent.csv"]))
    with pytest.raises(config.ConfigError, match="evaluate.gallery_split"):
        run_evaluate(spark, config.load(None, [f"run.output_root={root}", "evaluate.mode=split", "evaluate.gallery_split=db"]))
    with pytest.raises(config.ConfigError, match=r"evaluate.max_gallery_mb: the gallery is \d+ x \d+ float32"):
        run_evaluate(spark, config.load(None, [f"run.output_root={root}", "evaluate.mode=split", "evaluate.max_gallery_mb=0.001"]))


def check_page_in_browser(path: str, min_images: int) -> None:
    """Load a page in headless Chromium: it renders, every image decodes, no console errors."""
    browser = headless_browser()
    try:
        browser.get(f"file://{path}")
        assert browser.title
        images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(images) >= min_images
        broken = [alt for complete, width, alt in images if not complete or width == 0]
        assert not broken, f"images that did not load: {broken[:5]}"
        svgs = browser.execute_script("return document.querySelectorAll('svg').length")
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        return svgs
    finally:
        browser.quit()


def test_report_renders_in_a_real_browser(spark, collection):
    root, _ = collection
    m = run_evaluate(spark, config.load(None, [f"run.output_root={root}", "evaluate.report_queries=5", "run.keep_snapshots=10"]))
    path = os.path.join(m["output"].replace("file:", ""), "report.html")
    html = open(path, encoding="utf-8").read()
    assert "<script" not in html and "http://" not in html and "https://" not in html, "self-contained"
    assert html.count('class="cell query"') == 5 and "precision@i" in html and "Lineage" in html
    assert "hit" in html and "miss" in html, "frames by ground truth"
    svgs = check_page_in_browser(path, min_images=5 * 6)
    assert svgs >= 2, "the precision curve and the score histogram"

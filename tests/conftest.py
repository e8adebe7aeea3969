"""Shared fixtures: one local[2] SparkSession for the whole run, and the shared photo data."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CBIR_SHARED_DATA", ROOT.parent / "shared" / "data"))
CLOTHING = SHARED_DATA / "clothing-small"
DEDUP = SHARED_DATA / "dedup-fixtures"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# The job processes the tests start (spark-submit, airflow tasks, kill -9 victims) each run a
# JVM for seconds: its C2 JIT spends more CPU than it saves there (one evaluate task on the
# sample: 34 s of CPU with C2, 19 s with C1 only). The suite's own long-lived session keeps
# C2 (the `spark` fixture takes the option out): C1 made tests/neighbors/test_incremental_job
# 280 s against 263 s. Only where the caller has not set the variable itself.
SHORT_JVM = "-XX:TieredStopAtLevel=1"
os.environ.setdefault("SPARK_SUBMIT_OPTS", SHORT_JVM)


# The DAG test's dates start with the session and run beside the other tests
# (tests/dags/test_pipeline_dag.py, Dates); the test that checks them runs last. (These hooks
# live here: a conftest.py under tests/dags would shadow this one for `from conftest import`.)
DAG_DATES_TEST = "test_dags_test_runs_every_stage_then_reruns_and_two_incremental_dates"


def _dag_dates_items(items) -> list:
    return [it for it in items if getattr(it, "originalname", it.name) == DAG_DATES_TEST]


def pytest_collection_modifyitems(config, items):
    for it in _dag_dates_items(items):  # last: by then the dates have had the whole run to finish
        items.remove(it)
        items.append(it)


def pytest_collection_finish(session):
    found = _dag_dates_items(session.items)
    if not found or session.config.option.collectonly:
        return
    session.config._cbir_dag_dates = found[0].module.DATES
    found[0].module.DATES.start()


def pytest_sessionfinish(session, exitstatus):
    dates = getattr(session.config, "_cbir_dag_dates", None)
    if dates is not None:
        dates.stop(passed=exitstatus == 0)


def need_shared(path: Path = CLOTHING) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared photo data lives beside the project at ../shared/data")
    return path


@pytest.fixture(scope="session")
def spark():
    from cbir_lib.config import Config, SparkConfig
    from jobs._common import build_session

    cfg = Config(spark=SparkConfig(app_name="cbir-tests", master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    short = os.environ.get("SPARK_SUBMIT_OPTS") == SHORT_JVM
    if short:
        del os.environ["SPARK_SUBMIT_OPTS"]
    try:
        session = build_session(cfg)
    finally:
        if short:
            os.environ["SPARK_SUBMIT_OPTS"] = SHORT_JVM
    yield session
    session.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One converted Lite0 model for the whole run (conversion takes a few seconds)."""
    return str(tmp_path_factory.mktemp("models"))


def clothing_slice(dst: Path, classes: tuple[str, ...], per_class: int, split: str = "train") -> Path:
    """Copy the first ``per_class`` photos of each class into ``dst/<class>/``."""
    src = need_shared() / split
    for cls in classes:
        files = sorted((src / cls).iterdir())[:per_class]
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dst / cls / f.name)
    return dst


def _png_bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 100000 x 100000 pixels."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def make_odd_files() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, expected status, expected reason code or source mode)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))

    def save(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    good_jpeg = save(photo, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (0, 128, 255)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    palette = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (60, 80), dtype=np.uint8)))
    return {
        "zero_byte.jpg": (b"", "failed", "empty_file"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], "failed", "truncated"),
        "not_an_image.jpg": (b"%PDF-1.4 definitely not a picture\n" * 30, "failed", "not_an_image"),
        "bomb.png": (_png_bomb(), "failed", "too_large"),
        "good.jpg": (good_jpeg, "ok", "RGB"),
        "cmyk.jpg": (save(photo.convert("CMYK"), "JPEG"), "ok", "CMYK"),
        "sixteen_bit.png": (save(Image.fromarray((rng.integers(0, 65535, (60, 80))).astype(np.uint16)), "PNG"), "ok", "I;16"),
        "palette.png": (save(palette, "PNG", transparency=0), "ok", "P"),
        "alpha.png": (save(rgba, "PNG"), "ok", "RGBA"),
        "grey_alpha.png": (save(photo.convert("LA"), "PNG"), "ok", "LA"),
        "animated.gif": (gif.getvalue(), "ok", "P"),
        "exif_rotated.jpg": (save(photo, "JPEG", exif=exif), "ok", "RGB"),
    }


@pytest.fixture
def odd_files():
    return make_odd_files()


@pytest.fixture(scope="session")
def fixtures_run(spark, tmp_path_factory, model_cache):
    """The imagededup fixtures through ingest, extract, index and neighbours, once per session."""
    from cbir_lib import config
    from cbir_lib.features.run import run_extract
    from cbir_lib.images.run import run_ingest
    from cbir_lib.index.run import run_build_index
    from cbir_lib.neighbors.run import run_neighbors

    need_shared(DEDUP)
    src = tmp_path_factory.mktemp("fixtures") / "images"
    shutil.copytree(DEDUP, src)
    out = tmp_path_factory.mktemp("dedup-out")
    cfg = config.load(
        None, [f"run.output_root={out}", f"extract.model_cache={model_cache}", "run.keep_snapshots=10", "neighbors.rerank=none"]
    )
    run_ingest(spark, cfg, str(src))
    run_extract(spark, cfg)
    run_build_index(spark, cfg)
    run_neighbors(spark, cfg)
    return out, cfg


@pytest.fixture(scope="session")
def demo_out(spark, tmp_path_factory, model_cache):
    """``cbir demo``'s whole pipeline on the embedded sample, once per session: (output root, summary)."""
    from jobs import demo

    out = tmp_path_factory.mktemp("demo") / "output"
    summary = demo.main(["--output", str(out), "--set", f"extract.model_cache={model_cache}"])
    return out, summary


EMB_DDL = (
    "image_id long, path string, content_sha256 string, embedding array<float>, dim int, status string, error string, "
    "extract_run_id string"
)


def write_embeddings(spark, root: str, ids, x, run_id: str, n_failed: int = 3) -> None:
    """A committed embeddings snapshot of the given vectors (plus a few failed rows)."""
    import numpy as np

    from cbir_lib.common import fs, tables

    # The content hash stands in for the image's: the vector's own bytes.
    rows = [
        (
            int(i),
            f"/img/{i}.jpg",
            hashlib.sha256(np.asarray(v, np.float32).tobytes()).hexdigest(),
            v.tolist(),
            x.shape[1],
            "ok",
            None,
            run_id,
        )
        for i, v in zip(ids, x, strict=True)
    ]
    rows += [(10**15 + j, f"/img/bad{j}.jpg", None, None, None, "failed", "truncated", run_id) for j in range(n_failed)]
    df = spark.createDataFrame(rows, EMB_DDL)
    tables.commit(spark, df, fs.join(fs.qualify(spark, root), "embeddings"), run_id, {"run_id": run_id, "dim": int(x.shape[1])})


def headless_browser():
    """Debian's Chromium, headless, driven by selenium, with the console log kept (skips without it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium and chromedriver are not installed (make browser installs them from Debian)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)

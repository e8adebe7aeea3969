"""extract end to end on real photos: local[2], a killed run resumed, and a standalone cluster."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, clothing_slice, need_shared

from cbir_lib import config
from cbir_lib.common import tables
from cbir_lib.features.run import TABLE, run_extract
from cbir_lib.images.run import run_ingest

pytestmark = pytest.mark.slow

CLASSES = ("dress", "hat", "pants", "shoes")
PER_CLASS = 12


def _cfg(out, run_id, model_cache, *extra):
    # keep every snapshot: later tests compare against the first run
    return config.load(
        None, [f"run.output_root={out}", f"run.run_id={run_id}", f"extract.model_cache={model_cache}", "run.keep_snapshots=10", *extra]
    )


def _table(spark, out, run_id=None):
    table = os.path.join(str(out), TABLE)
    return spark.read.parquet(tables.run_dir(table, run_id or tables.latest_run_id(spark, table))).toPandas()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    need_shared()
    src = clothing_slice(tmp_path_factory.mktemp("clothing"), CLASSES, PER_CLASS)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return src


@pytest.fixture(scope="module")
def extracted(spark, photos, tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("out")
    run_ingest(spark, _cfg(out, "i1", model_cache), str(photos))
    manifest = run_extract(spark, _cfg(out, "e1", model_cache, "extract.shard_size=20"))
    return out, manifest


def _class_of(path: str) -> str:
    return Path(path.replace("file:", "")).parent.name


def test_counts_and_contract(spark, extracted):
    out, manifest = extracted
    c = manifest["counts"]
    assert c["input"] == len(CLASSES) * PER_CLASS + 1 == c["ok"] + c["failed"]
    assert c["failed"] == 1 and c["embedded_this_run"] == c["ok"] and c["reused"] == 0
    df = _table(spark, out)
    assert df["image_id"].is_unique and len(df) == c["input"]
    ok = df[df.status == "ok"]
    assert set(ok["dim"]) == {1280} and set(df["model"]) == {"efficientnet-lite1"} and set(df["pooling"]) == {"rmac"}
    vecs = np.stack(ok["embedding"].to_numpy())
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    bad = df[df.status == "failed"].iloc[0]
    assert bad["embedding"] is None and bad["error"].startswith("truncated") or bad["error"].startswith("decode_error")
    assert manifest["model"]["sha256"] and manifest["packages"]["tensorflow-cpu"]
    assert manifest["images_per_second"] > 0
    assert manifest["cost"]["core_seconds_per_image"] > 0 and manifest["cost"]["cores"] >= 1  # compared with dedup's
    lineage = json.loads(Path(str(out), TABLE, "run=e1", "_manifest.json").read_text())
    assert lineage["config"]["extract"]["pooling"] == "rmac" and lineage["counts"] == c


def test_neighbours_share_their_class(spark, extracted):
    out, _ = extracted
    ok = _table(spark, out).query("status == 'ok'")
    vecs = np.stack(ok["embedding"].to_numpy())
    classes = np.array([_class_of(p) for p in ok["path"]])
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    top5 = np.argsort(-sims, axis=1)[:, :5]
    precision = (classes[top5] == classes[:, None]).mean()
    chance = (PER_CLASS - 1) / (len(classes) - 1)
    assert precision > 0.8 > 3 * chance, precision


def test_spark_path_equals_direct_embedding(spark, extracted, model_cache):
    """The distributed result against the plain numpy/TF core on the same bytes."""
    from cbir_lib.config import ExtractConfig
    from cbir_lib.features.embedder import Embedder, EmbedSpec
    from cbir_lib.images.decode import decode_for_model
    from cbir_lib.models.backbones import resolve_artifact

    out, _ = extracted
    ok = _table(spark, out).query("status == 'ok'").head(6)
    ec = ExtractConfig(model_cache=model_cache)
    artifact = resolve_artifact(ec)
    emb = Embedder(EmbedSpec(artifact=artifact, pooling=ec.pooling, resize=ec.resize), artifact.local_path)
    images = np.stack(
        [
            decode_for_model(open(p.replace("file:", ""), "rb").read(), artifact.image_size, ec.resize, decoder=ec.decoder)[0]
            for p in ok["path"]
        ]
    )
    np.testing.assert_allclose(emb.embed(images), np.stack(ok["embedding"].to_numpy()), atol=1e-5)


def test_unchanged_rerun_is_a_noop(spark, extracted, model_cache):
    out, _ = extracted
    again = run_extract(spark, _cfg(out, "e2", model_cache))
    assert again.get("noop") is True and again["run_id"] == "e1"


def test_pwa_pooling_fits_its_parts_once_and_matches_the_core_and_the_query_path(spark, extracted, model_cache):
    """extract.pooling=pwa: part channels chosen from a sample and kept under _pwa/, the rows
    equal the numpy core with those channels, a second run reuses the file, and cbir query
    rebuilds the same descriptor from the manifest."""
    from cbir_lib.config import ExtractConfig
    from cbir_lib.features.embedder import Embedder, EmbedSpec
    from cbir_lib.features.pooling import pwa, pwa_select
    from cbir_lib.images.decode import decode_for_model
    from cbir_lib.models.backbones import resolve_artifact
    from cbir_lib.query import embed_query

    out, first = extracted
    m = run_extract(spark, _cfg(out, "p1", model_cache, "extract.pooling=pwa", "extract.pwa_parts=3", "extract.pwa_sample=10"))
    info = m["pwa"]
    assert info["parts"] == 3 and len(info["channels"]) == 3 and info["sample"] == 10
    assert m["dim"] == 3 * 1280 and m["feature_key"] != first["feature_key"]
    ok = _table(spark, out, "p1").query("status == 'ok'")
    ec = ExtractConfig(model_cache=model_cache)
    artifact = resolve_artifact(ec)
    core = Embedder(EmbedSpec(artifact=artifact, resize=ec.resize), artifact.local_path)
    files = sorted(p.replace("file:", "") for p in ok["path"])
    images = np.stack([decode_for_model(open(p, "rb").read(), artifact.image_size, ec.resize, decoder=ec.decoder)[0] for p in files])
    maps = core.feature_maps(images)
    # the sample: the first 10 ok images by xxhash64(image_id); the channels from their maps
    import pyspark.sql.functions as F

    sample = [
        r.path.replace("file:", "")
        for r in spark.createDataFrame(ok[["image_id", "path"]]).orderBy(F.xxhash64("image_id"), "image_id").limit(10).collect()
    ]
    pos = [files.index(p) for p in sample]
    assert pwa_select(maps[pos].sum(axis=(1, 2)), 3).tolist() == info["channels"]
    got = {p.replace("file:", ""): v for p, v in zip(ok["path"], ok["embedding"], strict=True)}
    np.testing.assert_allclose(np.stack([got[p] for p in files]), pwa(maps, info["channels"]), atol=1e-5)
    again = run_extract(spark, _cfg(out, "p2", model_cache, "extract.pooling=pwa", "extract.pwa_parts=3", "extract.pwa_sample=10"))
    assert again.get("noop") and again["run_id"] == "p1"
    manifest = json.loads(Path(str(out), TABLE, "run=p1", "_manifest.json").read_text())
    q = embed_query(open(files[0], "rb").read(), manifest, str(Path(str(out), TABLE, "run=p1")), model_cache)[0]
    np.testing.assert_allclose(q, got[files[0]], atol=1e-5)


def test_flip_tta_matches_the_core_and_the_query_path(spark, extracted, model_cache):
    """extract.tta=flip: a new raw key (everything re-embedded), the Spark rows equal the core's
    sum of both views, and cbir query rebuilds the same descriptor from the run's manifest."""
    from cbir_lib.config import ExtractConfig
    from cbir_lib.features.embedder import Embedder, EmbedSpec
    from cbir_lib.features.pooling import l2_normalize
    from cbir_lib.images.decode import decode_for_model
    from cbir_lib.models.backbones import resolve_artifact
    from cbir_lib.query import embed_query

    out, first = extracted
    m = run_extract(spark, _cfg(out, "t1", model_cache, "extract.tta=flip"))
    assert m["feature_key"] != first["feature_key"] and m["counts"]["embedded_this_run"] == first["counts"]["ok"]
    ok = _table(spark, out, "t1").query("status == 'ok'").head(4)
    ec = ExtractConfig(model_cache=model_cache)
    artifact = resolve_artifact(ec)
    plain = Embedder(EmbedSpec(artifact=artifact, pooling=ec.pooling, resize=ec.resize), artifact.local_path)
    files = [p.replace("file:", "") for p in ok["path"]]
    images = np.stack([decode_for_model(open(p, "rb").read(), artifact.image_size, ec.resize, decoder=ec.decoder)[0] for p in files])
    oracle = l2_normalize(plain._pool(plain.feature_maps(images)) + plain._pool(plain.feature_maps(images[:, :, ::-1].copy())))
    got = np.stack(ok["embedding"].to_numpy())
    np.testing.assert_allclose(got, oracle, atol=1e-5)
    assert (np.sum(got * plain.embed(images), axis=1) < 0.9999).any()  # not the single-view vector
    manifest = json.loads(Path(str(out), TABLE, "run=t1", "_manifest.json").read_text())
    run_dir = str(Path(str(out), TABLE, "run=t1"))
    np.testing.assert_allclose(embed_query(open(files[0], "rb").read(), manifest, run_dir, model_cache)[0], got[0], atol=1e-5)


def test_whitening_and_codes(spark, extracted, model_cache):
    out, first = extracted
    cfg = _cfg(out, "w1", model_cache, "extract.whitening=true", "extract.whitening_dim=32", "extract.binary_codes=true")
    m = run_extract(spark, cfg)
    assert m["counts"]["embedded_this_run"] == 0  # raw vectors reused: only post-processing reruns
    assert m["counts"]["reused"] == first["counts"]["ok"]
    assert m["dim"] == 32 and m["whitening"]["dim_out"] == 32
    df = _table(spark, out).query("status == 'ok'")
    vecs = np.stack(df["embedding"].to_numpy())
    assert vecs.shape[1] == 32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    codes = np.stack([np.frombuffer(c, np.uint8) for c in df["binary_code"]])
    thresholds = np.load(Path(str(out), TABLE, "run=w1", "_binary_thresholds.npy"))
    np.testing.assert_array_equal(codes, np.packbits(vecs > thresholds, axis=1))
    assert 0.3 < np.unpackbits(codes, axis=1).mean() < 0.7
    # the same again is a no-op; another whitening sample is not (it was ignored until 2026-12-03)
    assert run_extract(
        spark, _cfg(out, "w2", model_cache, "extract.whitening=true", "extract.whitening_dim=32", "extract.binary_codes=true")
    ).get("noop")
    other = run_extract(
        spark,
        _cfg(
            out,
            "w3",
            model_cache,
            "extract.whitening=true",
            "extract.whitening_dim=32",
            "extract.binary_codes=true",
            "extract.whitening_sample=40",
        ),
    )
    assert not other.get("noop") and other["run_id"] == "w3" and other["whitening"]["sample"] == 40
    refit = np.stack(_table(spark, out).query("status == 'ok'")["embedding"].to_numpy())
    run_dir = Path(str(out), TABLE)
    assert (run_dir / "run=w1" / "_whitening.npz").read_bytes() != (run_dir / "run=w3" / "_whitening.npz").read_bytes()
    assert refit.shape == vecs.shape and not np.allclose(refit, vecs, atol=1e-3)  # fitted on 40 of the 48 rows, not on all


def test_trained_head_gives_its_features_and_codes_without_re_embedding(spark, extracted, model_cache):
    """cbir train on run e1's embeddings, then extract.head: the head's code floats and bits."""
    from cbir_lib.config import ConfigError
    from cbir_lib.finetune.run import run_train
    from cbir_lib.models.head import apply_head, load_head
    from cbir_lib.vectors.codes import threshold

    out, first = extracted
    # Pinned to run e1 (later tests' runs are whitened); folders give the class, no split.
    cfg = _cfg(
        out,
        "e1",
        model_cache,
        "run.pin_inputs=true",
        "train.split=",
        "train.validation_split=",
        "train.bits=16",
        "train.hidden=32",
        "train.epochs=3",
        "train.workers=1",
    )
    trained = run_train(spark, cfg)
    assert trained["data"]["train"] == len(CLASSES) * PER_CLASS and trained["classes"] == sorted(CLASSES)
    m = run_extract(spark, _cfg(out, "h1", model_cache, f"extract.head={out}/models"))
    assert m["counts"]["embedded_this_run"] == 0 and m["dim"] == 16
    assert m["head"]["run_id"] == "e1" and m["binary_codes"]["bits"] == 16
    raw = _table(spark, out, "e1").query("status == 'ok'").set_index("image_id")
    df = _table(spark, out, "h1").query("status == 'ok'").set_index("image_id").loc[raw.index]
    _, weights = load_head(None, f"{out}/models")
    _, code, _ = apply_head(weights, np.stack(raw["embedding"].to_numpy()))
    vecs = np.stack(df["embedding"].to_numpy())
    np.testing.assert_allclose(vecs, (2 * code - 1) / np.linalg.norm(2 * code - 1, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(np.stack([np.frombuffer(c, np.uint8) for c in df["binary_code"]]), threshold(code))
    # A head trained on other embeddings (here: another pooling) is refused, by name.
    with pytest.raises(ConfigError, match="extract.head: .* was trained on embeddings"):
        run_extract(spark, _cfg(out, "h2", model_cache, f"extract.head={out}/models", "extract.pooling=gap"))


def _job(args, env=None, **kw):
    cmd = [sys.executable, "-m", *args]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _rows_in(files) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in files)


def test_a_night_writes_the_rows_it_embedded_in_files_of_their_own(spark, tmp_path, model_cache):
    """The second night's new and changed images are in files with no other row, and the
    table is the same set of rows it was before that layout: the index's incremental build
    reads only those files' vectors (cbir_lib/index/incremental.py: _read_added)."""
    import shutil

    import pyarrow.parquet as pq

    src = clothing_slice(tmp_path / "photos", ("dress", "hat"), 6)
    out = tmp_path / "out"
    run_ingest(spark, _cfg(out, "n1", model_cache), str(src))
    first = run_extract(spark, _cfg(out, "n1", model_cache, "extract.shard_size=4"))
    assert first["fresh_rows"] == first["counts"]["ok"]
    extra = clothing_slice(tmp_path / "more", ("pants",), 3)
    shutil.copytree(extra / "pants", src / "pants")
    changed = sorted((src / "dress").iterdir())[0]
    shutil.copy2(sorted((extra / "pants").iterdir())[0], changed)  # another photo under the same path
    run_ingest(spark, _cfg(out, "n2", model_cache), str(src))
    m = run_extract(spark, _cfg(out, "n2", model_cache, "extract.shard_size=4"))
    assert m["counts"]["embedded_this_run"] == m["fresh_rows"] == 4
    before = set(_table(spark, out, "n1").query("status == 'ok'")["image_id"])
    files = sorted(Path(str(out), TABLE, "run=n2").glob("*.parquet"))
    kinds = []
    for f in files:
        t = pq.read_table(f, columns=["image_id", "content_sha256", "path"]).to_pandas()
        old = t.image_id.isin(before) & ~t.path.str.endswith(changed.name)
        kinds.append("old" if old.all() else "fresh" if not old.any() else "mixed")
    assert "mixed" not in kinds and kinds.count("fresh") >= 1, kinds
    assert len(_table(spark, out, "n2")) == first["counts"]["input"] + 3


def test_killed_run_resumes_without_duplicates(spark, extracted, model_cache):
    """kill -9 of the whole job mid-way: the rerun skips every committed shard, redoes the rest."""
    out, first = extracted
    args = [
        "jobs.extract",
        "--output",
        str(out),
        "--run-id",
        "k1",
        "--master",
        "local[2]",
        "--set",
        f"extract.model_cache={model_cache}",
        "--set",
        "extract.pooling=mac",
        "--set",
        "extract.shard_size=6",
        "--set",
        "run.keep_snapshots=10",
    ]
    parts = os.path.join(str(out), TABLE, "_work", "*", "parts", "*.parquet")
    before = set(glob.glob(parts))  # the other runs' parts: not this job's
    proc = _job(args)
    deadline = time.time() + 240
    new_parts: set = set()
    while time.time() < deadline and proc.poll() is None:
        new_parts = set(glob.glob(parts)) - before
        if len(new_parts) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the job finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The driver is reaped first; a Python worker inside a rename when the signal came ends
    # the call before it dies. Count the parts once every process of the job is gone (the
    # full suite once saw one more shard committed after an earlier count).
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    committed = set(glob.glob(parts)) - before
    assert len(committed) >= 2, "no shard was committed before the kill"
    assert len(committed) < 8, "every shard was committed before the kill"
    done_rows = _rows_in(committed)
    assert tables.read_manifest(spark, os.path.join(str(out), TABLE), "k1") is None

    # The same run again, in this process (the killed one needed a process of its own).
    summary = run_extract(spark, _cfg(out, "k1", model_cache, "extract.pooling=mac", "extract.shard_size=6"))
    n_ok = first["counts"]["ok"]
    # finished work was not redone: every committed shard is skipped, the rest is done once
    assert summary["counts"]["embedded_this_run"] == n_ok - done_rows
    assert summary["counts"]["reused"] == done_rows
    assert _rows_in(set(glob.glob(parts)) - before) == n_ok  # no shard twice on disk
    df = _table(spark, out)
    assert df["image_id"].is_unique and len(df) == first["counts"]["input"]
    assert set(df["pooling"]) == {"mac"} and (df.status == "ok").sum() == first["counts"]["ok"]


def test_retried_attempt_after_its_commit_leaves_one_copy(spark, extracted, model_cache, tmp_path):
    """A task that dies right after committing its shard is retried: the retry finds the shard
    committed and does nothing, so the table holds each image once."""
    out, first = extracted
    args = [
        "jobs.extract",
        "--output",
        str(out),
        "--run-id",
        "r1",
        "--master",
        "local[2,3]",
        "--set",
        f"extract.model_cache={model_cache}",
        "--set",
        "extract.pooling=gem",
        "--set",
        "extract.shard_size=12",
        "--set",
        "run.keep_snapshots=10",
    ]
    proc = _job(args, env={"CBIR_FAULTS": f"extract.after_commit:{tmp_path}/faults"})
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert (tmp_path / "faults" / "extract.after_commit").exists(), "the fault never fired"
    manifest = json.loads(Path(str(out), TABLE, "run=r1", "_manifest.json").read_text())
    assert manifest["shards"]["outcomes"].get("already_committed") == 1
    assert manifest["counts"]["embedded_this_run"] == first["counts"]["ok"]
    key = manifest["feature_key"]
    files = glob.glob(os.path.join(str(out), TABLE, "_work", key, "parts", "*.parquet"))
    assert len(files) == manifest["shards"]["planned"] and _rows_in(files) == first["counts"]["ok"]
    df = _table(spark, out, "r1")
    assert df["image_id"].is_unique and len(df) == first["counts"]["input"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standalone_cluster(tmp_path):
    """A Spark standalone master and two workers on 127.0.0.1, started for this test."""
    import pyspark

    spark_home = os.path.dirname(pyspark.__file__)
    spark_class = os.path.join(spark_home, "bin", "spark-class")
    port, ui = _free_port(), _free_port()
    env = {**os.environ, "SPARK_HOME": spark_home, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_WORKER_DIR": str(tmp_path / "work")}
    procs = [
        subprocess.Popen(
            [
                spark_class,
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--webui-port",
                str(ui),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                [
                    spark_class,
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    "1",
                    "--memory",
                    "3g",
                    "--webui-port",
                    str(_free_port()),
                    f"spark://127.0.0.1:{port}",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    # Ready when the master's status page counts both workers alive (the workers retry
    # their registration until the master listens).
    import urllib.request

    deadline, alive = time.time() + 120, 0
    while time.time() < deadline and alive < 2:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as r:
                alive = json.loads(r.read())["aliveworkers"]
        except OSError:
            pass
        time.sleep(0.25)
    assert alive == 2, "the standalone cluster did not come up"
    yield f"spark://127.0.0.1:{port}"
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(timeout=30)


def test_same_result_on_a_standalone_cluster(spark, photos, extracted, standalone_cluster, tmp_path, model_cache):
    out = tmp_path / "cluster-out"
    common = [
        "--output",
        str(out),
        "--master",
        standalone_cluster,
        "--set",
        f"extract.model_cache={model_cache}",
        "--set",
        "spark.conf.spark.executor.memory=2g",
        "--set",
        "spark.conf.spark.cores.max=2",
    ]
    # ingest in this process; extract, the stage that scales out, as a job on the cluster.
    run_ingest(spark, _cfg(out, "c1", model_cache), str(photos))
    proc = _job(["jobs.extract", *common], env={"SPARK_LOCAL_IP": "127.0.0.1"})
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    shards = tables.read_manifest(spark, os.path.join(str(out), TABLE))["shards"]
    # both workers embedded shards, at the same time
    assert shards["executors"] == 2 and shards["peak_concurrent"] == 2 and shards["planned"] == 2, shards
    cluster = _table(spark, out).set_index("path")
    local = _table(spark, extracted[0], "e1").set_index("path")  # the gap run, same config
    assert sorted(cluster.index) == sorted(local.index)
    ok = local.index[local.status == "ok"]
    np.testing.assert_allclose(
        np.stack(cluster.loc[ok, "embedding"].to_numpy()), np.stack(local.loc[ok, "embedding"].to_numpy()), atol=1e-5
    )


def test_a_whitening_dim_beyond_the_embedding_is_a_config_error(spark, extracted, model_cache):
    from cbir_lib.config import ConfigError

    out, first = extracted
    with pytest.raises(ConfigError, match="extract.whitening_dim: 5000 is larger than the embedding's dimension 1280"):
        run_extract(spark, _cfg(out, "w2", model_cache, "extract.whitening=true", "extract.whitening_dim=5000"))

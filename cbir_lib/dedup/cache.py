"""Copy signatures kept between runs, by content: a night signs only the images it has not seen.

A copy signature (:mod:`cbir_lib.dedup.signature`) is a function of an image's bytes and
of the signature settings, and costs ~11 ms of a core and a read of the file; dedup needs
one for every image, every night. The cache keeps them under the dedup table:

    dedup/_signatures/<key>/<segment>/part-*.parquet  (content_sha256, <signature>)

``<key>`` names what a signature depends on besides the bytes: the settings
(``verify_max_side``, ``verify_features``, ``verify_photo_side``), :data:`VERSION` of the
signature code and the OpenCV version (ORB's keypoints). A run reads the segments its
base run's manifest names under the same key, signs the images whose content none of
them holds (one image per content), writes those as one new segment, and names the lot
in its own manifest (``signatures``). So a night reads and decodes only its new and
changed images, and a repeated night none.

- **Atomic and resumable.** A segment is written aside, renamed into place and marked
  with ``_SUCCESS`` last (a rename is a copy on object stores); its name is a hash of the
  key, the base's segments and the images snapshot, so a run killed after writing it and
  run again takes it as it is, and two runs never share a half-written one.
- **Bounded.** Where the segments would be more than :data:`MAX_SEGMENTS`, or more than
  :data:`DEAD_SHARE` of their rows are of contents no image has any more (deleted or
  changed images), the run writes one compacted segment instead: the live rows and the
  new ones.
- **Failures are not kept.** An image that cannot be read or decoded tonight has no
  signature (its pairs stay unverified, as before) and is tried again the next night: a
  file missing for a moment is no reason to skip it for good.
- **Collected.** After the commit, segments and keys no kept snapshot's manifest names are
  deleted (the stage holds the table's lease).
"""

from __future__ import annotations

import logging
import uuid

from cbir_lib.common import faults, fs, tables
from cbir_lib.common.shards import plan_tag
from cbir_lib.dedup.signature import SIGNATURE_COLUMNS, SIGNATURE_DDL

log = logging.getLogger(__name__)

CACHE_DIR = "_signatures"
# Bump when cbir_lib/dedup/signature.py computes a signature differently: it is in the key,
# so every cached signature of the older code is left alone and the run signs afresh.
VERSION = 1
MAX_SEGMENTS = 30  # a month of nights; more, and the next run compacts
DEAD_SHARE = 0.25  # cached rows of contents no image has any more, past which a run compacts
SEGMENT_FILE_BYTES = 128 << 20
SIGNATURE_BYTES = 48 << 10  # a signature at the defaults, about (ORB 2 x 400 x (32 + 8) B, a 192 px thumbnail)


def key(dd) -> str:
    """What a cached signature depends on besides the image's bytes (see the module)."""
    import cv2

    return "v{}-{}".format(VERSION, plan_tag(dd.verify_max_side, dd.verify_features, dd.verify_photo_side, cv2.__version__))


def _ddl() -> str:
    return f"content_sha256 string, {SIGNATURE_DDL}"


def cached_signatures(spark, table: str, base: dict | None, images_commit: str | None, ok, dd, compute):
    """``(sig, record)``: ``sig(image_id, <signature>)`` for every row of ``ok(image_id,
    path, content_sha256)``, null where the image could not be signed, and the manifest's
    ``signatures`` record. ``compute(todo(image_id, path, content_sha256))`` signs the images
    not in the cache, checkpointed (:func:`cbir_lib.dedup.run.signatures` carrying
    ``content_sha256``)."""
    from pyspark.sql import functions as F

    k = key(dd)
    root = fs.join(table, CACHE_DIR, k)
    prev = (base or {}).get("signatures") or {}
    segments = list(prev.get("segments") or []) if prev.get("key") == k else []
    fresh = None  # why the run starts a new cache, if it does
    if prev.get("key") != k:
        fresh = "no earlier signatures" if not prev.get("key") else f"the signature key changed ({prev['key']} -> {k})"
    elif not all(fs.exists(spark, fs.join(root, s["name"], "_SUCCESS")) for s in segments):
        fresh, segments = f"a signatures segment of run {(base or {}).get('run_id')} is gone", []
    cache = _read(spark, root, segments)
    keyed = ok.select("image_id", "path", "content_sha256")
    known = keyed.filter(F.col("content_sha256").isNotNull())
    todo = known.join(cache.select("content_sha256"), "content_sha256", "left_anti") if segments else known
    # One image per content (byte-identical copies share a signature): the smallest id.
    first = F.min(F.struct("image_id", "path")).alias("first")
    todo = todo.groupBy("content_sha256").agg(first).select("first.image_id", "first.path", "content_sha256")

    cached_rows = sum(int(s["rows"]) for s in segments)
    contents = known.select("content_sha256").distinct()
    live = contents.join(cache.select("content_sha256"), "content_sha256", "left_semi").count() if segments else 0
    compact = bool(segments) and (len(segments) + 1 > MAX_SEGMENTS or cached_rows - live > DEAD_SHARE * cached_rows)
    name = "seg-" + plan_tag(k, [s["name"] for s in segments], images_commit, "compact" if compact else "")
    seg_uri = fs.join(root, name)
    resumed = fs.exists(spark, fs.join(seg_uri, "_SUCCESS"))
    computed = failed = 0
    if resumed:
        log.info("dedup: signatures segment %s is already written (by a run killed after it): taken as it is", name)
        n_rows = _read(spark, root, [{"name": name}]).count()
    else:
        new = compute(todo)
        counts = {r.signed: r["count"] for r in new.groupBy(F.col("hashes").isNotNull().alias("signed")).count().collect()}
        computed, failed = int(counts.get(True, 0)), int(counts.get(False, 0))
        rows = new.filter(F.col("hashes").isNotNull()).select("content_sha256", *SIGNATURE_COLUMNS)
        if compact:  # the live cached rows and tonight's, in one segment
            rows = cache.join(contents, "content_sha256", "left_semi").unionByName(rows)
        n_rows = (live if compact else 0) + computed
        if n_rows:
            files = max(1, -(-n_rows * SIGNATURE_BYTES // SEGMENT_FILE_BYTES))
            tmp = fs.join(table, CACHE_DIR, "_tmp", uuid.uuid4().hex)
            rows.coalesce(files).write.mode("overwrite").parquet(tmp)
            fs.delete(spark, seg_uri)  # one left without its _SUCCESS by a killed run
            fs.rename(spark, tmp, seg_uri)
            fs.create_file(spark, fs.join(seg_uri, "_SUCCESS"), b"")  # last: the segment is whole
            faults.point("dedup.signatures.after_segment")
    if n_rows or compact:
        segments = [*([] if compact else segments), {"name": name, "rows": int(n_rows)}]
    # Left: an image whose content has no signature (unreadable tonight) gets nulls.
    sig = keyed.select("image_id", "content_sha256").join(_read(spark, root, segments), "content_sha256", "left")
    record = {
        "key": k,
        "segments": segments,
        "computed": computed,
        "failed": failed,
        "reused": int(live),
        "resumed": resumed,
        "compacted": compact,
        "fresh_because": fresh,
    }
    log.info(
        "dedup: copy signatures: %d signed in this run, %d unsigned, %d taken from earlier runs; %d segments%s%s",
        computed,
        failed,
        live,
        len(segments),
        " (compacted)" if compact else "",
        f"; a new cache: {fresh}" if fresh else "",
    )
    return sig.drop("content_sha256"), record


def _read(spark, root: str, segments: list[dict]):
    """The cached rows of ``segments`` (an empty frame for none)."""
    if not segments:
        return spark.createDataFrame([], _ddl())
    return spark.read.schema(_ddl()).parquet(*[fs.join(root, s["name"]) for s in segments])


def collect_garbage(spark, table: str) -> list[str]:
    """Delete the segments and keys no committed snapshot of ``table`` names; returns what
    it deleted. Run after a commit, under the table's lease."""
    named: dict[str, set[str]] = {}
    for run_id in tables.committed_runs(spark, table):
        rec = (tables.read_manifest(spark, table, run_id) or {}).get("signatures") or {}
        if rec.get("key"):
            named.setdefault(rec["key"], set()).update(s["name"] for s in rec.get("segments") or [])
    base = fs.join(table, CACHE_DIR)
    gone = []
    for k in fs.list_names(spark, base):
        for name in fs.list_names(spark, fs.join(base, k)) if k in named else [None]:
            if name is None or name not in named[k]:
                fs.delete(spark, fs.join(base, k, name) if name else fs.join(base, k))
                gone.append(f"{k}/{name}" if name else k)
    if gone:
        log.info("dedup: deleted %d signature segments or keys no snapshot names: %s", len(gone), ", ".join(gone[:8]))
    return gone

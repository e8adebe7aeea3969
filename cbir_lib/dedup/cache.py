"""What dedup keeps between runs, by content: a night signs and verifies only what is new.

dedup's two costs per image are functions of image contents and settings alone:

- the **copy signature** of an image (:mod:`cbir_lib.dedup.signature`): a read of the
  file, a decode and ~11-15 ms of a core;
- the **verdict** of a candidate pair (:mod:`cbir_lib.dedup.verify`, seeded RANSAC): ~3
  ms of a core, up to ``band_per_image`` pairs an image.

Every run made both for every image. The caches keep them under the dedup table:

    dedup/_signatures/<key>/<segment>/  (content_sha256, <signature>)
    dedup/_verdicts/<key>/<segment>/    (sha_a, sha_b, inliers, agreement)

``<key>`` names what a row depends on besides the contents: the signature settings
(``verify_max_side``, ``verify_features``, ``verify_photo_side``), :data:`VERSION` of the
code and the OpenCV version (ORB's keypoints); for verdicts also ``min_inliers`` and
``min_agreement``. A run reads the segments its base run's manifest names under the same
key, computes what none of them holds (one image per content; one image pair per pair of
contents, in the pair's ``(a, b)`` order), writes that as one new segment, and names the
lot in its own manifest (``signatures``, ``verdicts``). So a night reads, decodes and
verifies only around its new and changed images, and a repeated night nothing.

- **Atomic and resumable.** A segment is written aside, renamed into place and marked
  with ``_SUCCESS`` last (a rename is a copy on object stores); its name is a hash of the
  key, the base's segments and the run's inputs, so a run killed after writing it and run
  again takes it as it is, and two runs never share a half-written one.
- **Bounded.** Where the segments would be more than :data:`MAX_SEGMENTS`, or (for
  signatures, whose live rows a run counts anyway) more than :data:`DEAD_SHARE` of their
  rows are of contents no image has any more, the run writes one compacted segment
  instead: the live rows and the new ones. A verdict is live while both its contents are.
- **Failures are not kept.** An image that cannot be read or decoded tonight has no
  signature, and a pair without both signatures or whose check raised has no verdict;
  they are tried again the next night (a file missing for a moment is no reason to skip it
  for good).
- **Collected.** After the commit, segments and keys no kept snapshot's manifest names are
  deleted (the stage holds the table's lease).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from cbir_lib.common import faults, fs, tables
from cbir_lib.common.shards import plan_tag
from cbir_lib.dedup.signature import SIGNATURE_COLUMNS, SIGNATURE_DDL

log = logging.getLogger(__name__)

# Bump when cbir_lib/dedup/signature.py or verify.py computes differently: it is in the
# keys, so the rows of the older code are left alone and a run computes afresh.
VERSION = 1
MAX_SEGMENTS = 30  # a month of nights; more, and the next run compacts
DEAD_SHARE = 0.25  # cached signatures of contents no image has any more, past which a run compacts
SEGMENT_FILE_BYTES = 128 << 20


@dataclass(frozen=True)
class Kind:
    """One cache: its folder under the table, manifest field, row schema and row size."""

    folder: str
    field: str
    ddl: str
    row_bytes: int


SIGNATURES = Kind("_signatures", "signatures", f"content_sha256 string, {SIGNATURE_DDL}", 48 << 10)  # ORB 2 x 400 x 40 B, a thumbnail
VERDICTS = Kind("_verdicts", "verdicts", "sha_a string, sha_b string, inliers int, agreement float", 160)
KINDS = (SIGNATURES, VERDICTS)


def signature_key(dd) -> str:
    """What a cached signature depends on besides the image's bytes."""
    import cv2

    return "v{}-{}".format(VERSION, plan_tag(dd.verify_max_side, dd.verify_features, dd.verify_photo_side, cv2.__version__))


def verdict_key(dd) -> str:
    """What a cached verdict depends on besides the two contents: their signatures' key and
    the thresholds (the check stops at the first attempt that passes them)."""
    return "v{}-{}".format(VERSION, plan_tag(signature_key(dd), dd.min_inliers, dd.min_agreement))


class _Segments:
    """The segments of one cache a run starts from (its base run's, under this key)."""

    def __init__(self, spark, table: str, kind: Kind, key: str, base: dict | None):
        self.spark, self.table, self.kind, self.key = spark, table, kind, key
        self.root = fs.join(table, kind.folder, key)
        prev = (base or {}).get(kind.field) or {}
        self.segments: list[dict] = list(prev.get("segments") or []) if prev.get("key") == key else []
        self.fresh = None  # why the run starts a new cache, if it does
        if prev.get("key") != key:
            self.fresh = "no earlier run kept any" if not prev.get("key") else f"the key changed ({prev['key']} -> {key})"
        elif not all(fs.exists(spark, fs.join(self.root, s["name"], "_SUCCESS")) for s in self.segments):
            self.fresh, self.segments = f"a segment of run {(base or {}).get('run_id')} is gone", []

    @property
    def rows(self) -> int:
        return sum(int(s["rows"]) for s in self.segments)

    def read(self, segments: list[dict] | None = None):
        """The rows of ``segments`` (the base's by default; an empty frame for none)."""
        segments = self.segments if segments is None else segments
        if not segments:
            return self.spark.createDataFrame([], self.kind.ddl)
        return self.spark.read.schema(self.kind.ddl).parquet(*[fs.join(self.root, s["name"]) for s in segments])

    def add(self, inputs: str, compact: bool, make) -> tuple[list[dict], bool, int]:
        """Write the run's segment, ``make() -> (rows frame, row count)``, unless a killed run
        with the same inputs wrote it; ``(the run's segments, resumed, rows)``. With
        ``compact`` the segment replaces the base's (``make`` then gives every live row)."""
        name = "seg-" + plan_tag(self.key, [s["name"] for s in self.segments], inputs, "compact" if compact else "")
        uri = fs.join(self.root, name)
        resumed = fs.exists(self.spark, fs.join(uri, "_SUCCESS"))
        if resumed:
            log.info("dedup: %s segment %s was written by a run killed after it: taken as it is", self.kind.field, name)
            n = self.read([{"name": name}]).count()
        else:
            rows, n = make()
            if n:
                files = max(1, -(-n * self.kind.row_bytes // SEGMENT_FILE_BYTES))
                tmp = fs.join(self.table, self.kind.folder, "_tmp", uuid.uuid4().hex)
                rows.coalesce(files).write.mode("overwrite").parquet(tmp)
                fs.delete(self.spark, uri)  # one left without its _SUCCESS by a killed run
                fs.rename(self.spark, tmp, uri)
                fs.create_file(self.spark, fs.join(uri, "_SUCCESS"), b"")  # last: the segment is whole
                faults.point(f"dedup.{self.kind.field}.after_segment")
        # A compaction to nothing (every image gone or unreadable) leaves no segment at all.
        out = [*([] if compact else self.segments), *([{"name": name, "rows": int(n)}] if n else [])]
        return out, resumed, int(n)

    def record(self, segments: list[dict], **counts) -> dict:
        return {"key": self.key, "segments": segments, **counts, "fresh_because": self.fresh}


def cached_signatures(spark, table: str, base: dict | None, inputs: str, ok, dd, compute):
    """``(sig, record)``: ``sig(image_id, <signature>)`` for every row of ``ok(image_id,
    path, content_sha256)`` (the content hash never null: the caller keys a row without one
    to its snapshot), null where the image could not be signed, and the manifest's
    ``signatures`` record. ``compute(todo(image_id, path, content_sha256))`` signs the images
    not in the cache, checkpointed (:func:`cbir_lib.dedup.run.signatures` carrying
    ``content_sha256``). ``inputs``: what the run's images are (the images commit)."""
    from pyspark.sql import functions as F

    seg = _Segments(spark, table, SIGNATURES, signature_key(dd), base)
    cache = seg.read()
    keyed = ok.select("image_id", "path", "content_sha256")
    contents = keyed.select("content_sha256").distinct()
    # Each content, kept or not: one pass over the cache's hashes gives both what to sign
    # and how many kept rows are live.
    kept = F.lit(True).alias("kept")
    marked = contents.join(cache.select("content_sha256", kept), "content_sha256", "left").localCheckpoint() if seg.segments else None
    new_contents = marked.filter(F.col("kept").isNull()).select("content_sha256") if marked is not None else contents
    live = marked.filter(F.col("kept")).count() if marked is not None else 0
    # One image per new content (byte-identical copies share a signature): the smallest id.
    first = F.min(F.struct("image_id", "path")).alias("first")
    todo = keyed.join(new_contents, "content_sha256", "left_semi").groupBy("content_sha256").agg(first)
    todo = todo.select("first.image_id", "first.path", "content_sha256")
    compact = bool(seg.segments) and (len(seg.segments) + 1 > MAX_SEGMENTS or seg.rows - live > DEAD_SHARE * seg.rows)
    counts = {"computed": 0, "failed": 0}

    def make():
        new = compute(todo)
        signed = {r.signed: r["count"] for r in new.groupBy(F.col("hashes").isNotNull().alias("signed")).count().collect()}
        counts.update(computed=int(signed.get(True, 0)), failed=int(signed.get(False, 0)))
        rows = new.filter(F.col("hashes").isNotNull()).select("content_sha256", *SIGNATURE_COLUMNS)
        if compact:  # the live cached rows and tonight's, in one segment
            return cache.join(contents, "content_sha256", "left_semi").unionByName(rows), live + counts["computed"]
        return rows, counts["computed"]

    segments, resumed, _ = seg.add(inputs, compact, make)
    # Left: an image whose content has no signature (unreadable tonight) gets nulls. Held as a
    # run that signs everything holds it (a checkpoint, hash-partitioned by image id), read
    # by the dihedral pairs and the verification.
    sig = keyed.select("image_id", "content_sha256").join(seg.read(segments), "content_sha256", "left").drop("content_sha256")
    sig = sig.repartition(max(1, 2 * spark.sparkContext.defaultParallelism), "image_id").localCheckpoint()
    record = seg.record(segments, **counts, reused=int(live), resumed=resumed, compacted=compact)
    _log(record)
    return sig, record


def cached_verdicts(spark, table: str, base: dict | None, inputs: str, pairs, contents, dd, compute):
    """``(verdicts, record)``: ``verdicts(a, b, inliers, agreement, unverified)`` of every
    pair of ``pairs(a, b, sha_a, sha_b)`` (the contents of images a and b), and the
    manifest's ``verdicts`` record. ``compute(todo(a, b))`` verifies the pairs whose pair of
    contents the cache does not hold (:func:`cbir_lib.dedup.run.verified_pairs`), once per
    pair of contents. ``contents(content_sha256)``: the collection's contents, for
    compaction. ``inputs``: what the run's candidate pairs depend on."""
    from pyspark.sql import functions as F

    seg = _Segments(spark, table, VERDICTS, verdict_key(dd), base)
    both = ["sha_a", "sha_b"]
    pairs = pairs.select("a", "b", *both).distinct()
    # Each pair with its cached verdict, if any: one pass over the cache, held for the run.
    looked = pairs.join(seg.read(), both, "left").localCheckpoint() if seg.segments else None
    hit = F.col("inliers").isNotNull()
    missing = looked.filter(~hit).select("a", "b", *both) if looked is not None else pairs
    # One image pair per pair of contents (its smallest (a, b)); the rest take its verdict.
    first = F.min(F.struct("a", "b")).alias("first")
    todo = missing.groupBy(*both).agg(first).select("first.a", "first.b", *both)
    compact = len(seg.segments) + 1 > MAX_SEGMENTS
    counts = {"computed": 0, "failed": 0}
    held: dict = {}

    def make():
        new = compute(todo.select("a", "b")).join(todo, ["a", "b"]).localCheckpoint()
        held["new"] = new
        ok_ = F.col("unverified").isNull()
        done = {r.ok: r["count"] for r in new.groupBy(ok_.alias("ok")).count().collect()}
        counts.update(computed=int(done.get(True, 0)), failed=int(done.get(False, 0)))
        rows = new.filter(ok_).select(*both, "inliers", "agreement")
        if compact:  # the cached verdicts whose two contents are both still here, and tonight's
            alive = (
                seg.read()
                .join(contents.select(F.col("content_sha256").alias("sha_a")), "sha_a", "left_semi")
                .join(contents.select(F.col("content_sha256").alias("sha_b")), "sha_b", "left_semi")
            )
            rows = alive.select(*both, "inliers", "agreement").unionByName(rows).localCheckpoint()
            return rows, rows.count()
        return rows, counts["computed"]

    segments, resumed, _ = seg.add(inputs, compact, make)
    cols = ["a", "b", "inliers", "agreement", "unverified"]
    unverified = F.lit(None).cast("string").alias("unverified")
    hits = looked.filter(hit).select("a", "b", "inliers", "agreement", unverified) if looked is not None else None
    if "new" in held:  # tonight's verdicts (and failures, not kept) for every image pair of their contents
        tonight = missing.join(held["new"].select(*both, "inliers", "agreement", "unverified"), both).select(*cols)
    else:  # a killed run's segment: its verdicts are read back; its failures were not kept, so check them again
        back = missing.join(seg.read(segments[-1:]), both, "left")
        found = back.filter(hit).select("a", "b", "inliers", "agreement", unverified)
        tonight = found.unionByName(compute(back.filter(~hit).select("a", "b")).select(*cols))
    verdicts = tonight if hits is None else hits.unionByName(tonight)
    reused = looked.filter(hit).count() if looked is not None else 0
    record = seg.record(segments, **counts, reused=int(reused), resumed=resumed, compacted=compact)
    _log(record)
    return verdicts, record


def _log(record: dict) -> None:
    log.info(
        "dedup: %s: %d computed in this run, %d failed, %d taken from earlier runs; %d segments%s%s",
        record["key"],
        record["computed"],
        record["failed"],
        record["reused"],
        len(record["segments"]),
        " (compacted)" if record["compacted"] else "",
        f"; a new cache: {record['fresh_because']}" if record["fresh_because"] else "",
    )


def collect_garbage(spark, table: str) -> list[str]:
    """Delete the segments and keys no committed snapshot of ``table`` names; returns what
    it deleted. Run after a commit, under the table's lease."""
    named: dict[tuple[str, str], set[str]] = {}
    manifests = [tables.read_manifest(spark, table, r) or {} for r in tables.committed_runs(spark, table)]
    for kind in KINDS:
        for m in manifests:
            rec = m.get(kind.field) or {}
            if rec.get("key"):
                named.setdefault((kind.folder, rec["key"]), set()).update(s["name"] for s in rec.get("segments") or [])
    gone = []
    for kind in KINDS:
        base = fs.join(table, kind.folder)
        for k in fs.list_names(spark, base):
            keep = named.get((kind.folder, k))
            for name in fs.list_names(spark, fs.join(base, k)) if keep is not None else [None]:
                if name is None or name not in keep:
                    fs.delete(spark, fs.join(base, k, name) if name else fs.join(base, k))
                    gone.append(f"{kind.folder}/{k}" + (f"/{name}" if name else ""))
    if gone:
        log.info("dedup: deleted %d cache segments or keys no snapshot names: %s", len(gone), ", ".join(gone[:8]))
    return gone

"""Driver-side file operations on any Hadoop filesystem URI (file://, hdfs://, s3a://).

They go through the JVM's Hadoop FileSystem of the active SparkSession, so every scheme
Spark can read, with the credentials Spark is configured with, works here too. Small
files (manifests, pointers, whitening matrices) are written to a temporary name and
renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import uuid
from typing import Any


def _jvm(spark):
    return spark.sparkContext._jvm


def _path(spark, uri: str):
    return _jvm(spark).org.apache.hadoop.fs.Path(uri)


def _fs(spark, uri: str):
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    return _path(spark, uri).getFileSystem(conf)


def qualify(spark, uri: str) -> str:
    """Make ``uri`` absolute and scheme-qualified (``output`` -> ``file:/cwd/output``)."""
    fs = _fs(spark, uri)
    return fs.makeQualified(_path(spark, uri)).toString()


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def exists(spark, uri: str) -> bool:
    return bool(_fs(spark, uri).exists(_path(spark, uri)))


def delete(spark, uri: str, recursive: bool = True) -> None:
    fs = _fs(spark, uri)
    p = _path(spark, uri)
    if fs.exists(p):
        fs.delete(p, recursive)


def mkdirs(spark, uri: str) -> None:
    _fs(spark, uri).mkdirs(_path(spark, uri))


def rename(spark, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; ``dst``'s parent is created. Raises if it fails."""
    fs = _fs(spark, src)
    dst_path = _path(spark, dst)
    fs.mkdirs(dst_path.getParent())
    if not fs.rename(_path(spark, src), dst_path):
        raise OSError(f"could not rename {src} to {dst}")


def list_names(spark, uri: str) -> list[str]:
    """Names of the entries directly under ``uri`` (empty if it does not exist)."""
    fs = _fs(spark, uri)
    p = _path(spark, uri)
    if not fs.exists(p):
        return []
    return sorted(status.getPath().getName() for status in fs.listStatus(p))


def modified_s(spark, uri: str) -> float | None:
    """The file's modification time in seconds since the epoch (None if it does not exist)."""
    fs = _fs(spark, uri)
    p = _path(spark, uri)
    if not fs.exists(p):
        return None
    return fs.getFileStatus(p).getModificationTime() / 1000.0


def create_file(spark, uri: str, data: bytes) -> None:
    """Write ``data`` as ``uri`` in one create (one PUT on an object store), replacing it."""
    out = _fs(spark, uri).create(_path(spark, uri), True)
    try:
        out.write(bytearray(data))
    finally:
        out.close()


# Stores whose rename is a copy: there one PUT is the atomic way to replace a small file.
OBJECT_STORES = ("s3a", "s3", "s3n", "gs", "abfs", "abfss", "wasb", "wasbs", "oss", "cos")


def write_bytes(spark, uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that a reader sees the old file or the new one, never none.

    On an object store the file is written in one PUT (an object appears whole or not at
    all). Elsewhere a temporary sibling is renamed over it with Hadoop's
    ``FileContext.rename(OVERWRITE)``, atomic on HDFS and local disks; there was a window
    between deleting the old file and renaming the new one in which a crash left no
    ``_LATEST`` pointer or manifest.
    """
    from cbir_lib.common import faults

    dst = _path(spark, uri)
    if (dst.toUri().getScheme() or "").lower() in OBJECT_STORES:
        create_file(spark, uri, data)
        return
    tmp_uri = f"{uri}.{uuid.uuid4().hex}.tmp"
    create_file(spark, tmp_uri, data)
    tmp = _path(spark, tmp_uri)
    faults.point("fs.write_bytes.before_replace")
    jvm = _jvm(spark)
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    fc = jvm.org.apache.hadoop.fs.FileContext.getFileContext(dst.toUri(), conf)
    options = spark.sparkContext._gateway.new_array(jvm.org.apache.hadoop.fs.Options.Rename, 1)
    options[0] = jvm.org.apache.hadoop.fs.Options.Rename.OVERWRITE
    try:
        fc.rename(tmp, dst, options)
    except Exception as e:  # noqa: BLE001 - py4j wraps the IOException
        _fs(spark, uri).delete(tmp, False)
        raise OSError(f"could not write {uri}: {e}") from None


def read_bytes(spark, uri: str) -> bytes:
    """The bytes of ``uri``. A ``file:`` URI is read by this process: through py4j a file's
    bytes cross the gateway encoded, ~0.1 s per 3 MB of centroids here."""
    from cbir_lib.common import remote

    path = remote.local_path(uri)
    if path is not None:
        with open(path, "rb") as fh:
            return fh.read()
    return _read_bytes_jvm(spark, uri)


def _read_bytes_jvm(spark, uri: str) -> bytes:
    fs = _fs(spark, uri)
    p = _path(spark, uri)
    length = fs.getFileStatus(p).getLen()
    stream = fs.open(p)
    try:
        jvm = _jvm(spark)
        buf = jvm.java.io.ByteArrayOutputStream()
        jvm.org.apache.hadoop.io.IOUtils.copyBytes(stream, buf, 1 << 16, False)
        data = bytes(buf.toByteArray())
    finally:
        stream.close()
    if len(data) != length:
        raise OSError(f"short read of {uri}: {len(data)} of {length} bytes")
    return data


def write_json(spark, uri: str, obj: Any) -> None:
    write_bytes(spark, uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(spark, uri: str) -> Any:
    return json.loads(read_bytes(spark, uri).decode("utf-8"))


_GLOB_CHARS = "\\{}[]*?"


def escape_glob(uri: str) -> str:
    """Escape Hadoop glob characters so a literal path can be passed to ``load``."""
    return "".join("\\" + c if c in _GLOB_CHARS else c for c in uri)


_LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


def read_files(spark, uris: list[str]):
    """``(path, content)`` of the named files, read by Spark's ``binaryFile`` source.

    Given more than 32 paths, Spark checks them in a listing job of one task per path (up to
    ``parallelPartitionDiscovery.parallelism``, 10,000): for a 2,048-image extract chunk that
    job cost a quarter of the chunk's time on 2 local cores (benchmarks/results/extract.json).
    The same checks in one task per executor slot keep the listing distributed, which object
    stores need, at a fraction of the scheduling. The setting is restored once the paths are
    listed (``load`` lists eagerly). Raises ``AnalysisException`` when a path is missing.
    """
    previous = spark.conf.get(_LISTING_PARALLELISM, None)
    spark.conf.set(_LISTING_PARALLELISM, str(max(1, spark.sparkContext.defaultParallelism)))
    try:
        return spark.read.format("binaryFile").load([escape_glob(u) for u in uris]).select("path", "content")
    finally:
        if previous is None:
            spark.conf.unset(_LISTING_PARALLELISM)
        else:
            spark.conf.set(_LISTING_PARALLELISM, previous)

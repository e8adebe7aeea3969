"""Ground truth for evaluation: a label (and optional split) for each image.

Three sources (``evaluate.labels``):

- ``folders``: the image's parent folder is its class and the folder above it, when it
  is one of :data:`SPLITS`, its split (``clothing-small/<split>/<class>/x.jpg``);
- ``groups``: the embedded demo sample's ``groups.csv`` (each original and its edited
  copies form a group);
- any other value: a CSV file or URI with a header and columns ``label`` (or ``group``
  or ``class``), ``image_id`` or a path column (``path`` or ``file``, relative paths
  resolved against ``evaluate.labels_base``, default the CSV's folder), and optionally
  ``split``.

Images without a label are neither queries nor relevant to anyone.
"""

from __future__ import annotations

import csv
import io
import os

from cbir_lib.common import fs
from cbir_lib.config import ConfigError

SPLITS = ("train", "validation", "val", "test", "query", "gallery", "database", "db")
LABEL_COLUMNS = ("label", "group", "class")
PATH_COLUMNS = ("path", "file")
SCHEMA = "image_id long, label string, split string"


def normalise_path(col):
    """``file:/x``, ``file:///x`` and ``/x`` are the same local file; other URIs as they are."""
    from pyspark.sql import functions as F

    return F.regexp_replace(col, r"^file:(//)?(?=/)", "")


def _norm(path: str) -> str:
    for prefix in ("file://", "file:"):
        if path.startswith(prefix) and path[len(prefix) :].startswith("/"):
            return path[len(prefix) :]
    return path


def from_folders(images):
    """``(image_id, label, split)`` from each path's last two folders."""
    from pyspark.sql import functions as F

    parts = F.split(normalise_path(F.col("path")), "/")
    n = F.size(parts)
    parent = F.element_at(parts, n - 1)
    grand = F.when(n >= 3, F.element_at(parts, n - 2))
    return images.select(
        "image_id",
        parent.alias("label"),
        F.when(F.lower(grand).isin(*SPLITS), F.lower(grand)).alias("split"),
    )


def _read_csv_rows(spark, uri: str) -> list[dict[str, str]]:
    if not fs.exists(spark, uri):
        raise ConfigError(f"evaluate.labels: no such labels file: {uri}")
    # No error below quotes the file: evaluate.labels may name a file that is not a labels
    # CSV at all (a mistake, or a DAG trigger probing the worker's disk).
    try:
        text = fs.read_bytes(spark, uri).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error):
        raise ConfigError(f"evaluate.labels: {uri} is not a UTF-8 CSV file") from None
    if not rows:
        raise ConfigError(f"evaluate.labels: {uri} has no rows")
    return rows


def from_csv(spark, images, uri: str, base: str | None = None):
    """``(image_id, label, split)`` from a labels CSV joined to the images by id or path."""
    from pyspark.sql import functions as F

    rows = _read_csv_rows(spark, uri)
    cols = set(rows[0])
    label_col = next((c for c in LABEL_COLUMNS if c in cols), None)
    if label_col is None:
        raise ConfigError(f"evaluate.labels: {uri} needs a column named one of {LABEL_COLUMNS}; its header has {len(cols)} other columns")
    split = [r.get("split") or None for r in rows]
    if "image_id" in cols:
        try:
            data = [(int(r["image_id"]), r[label_col], s) for r, s in zip(rows, split, strict=True)]
        except (TypeError, ValueError):
            raise ConfigError(f"evaluate.labels: {uri}: every image_id must be an integer") from None
        return spark.createDataFrame(data, SCHEMA)
    path_col = next((c for c in PATH_COLUMNS if c in cols), None)
    if path_col is None:
        raise ConfigError(f"evaluate.labels: {uri} needs an image_id or a path column ({PATH_COLUMNS}); its header has neither")
    base = _norm(base or uri.rsplit("/", 1)[0])
    paths = []
    for r in rows:
        p = _norm(r[path_col])
        paths.append(p if "://" in p or p.startswith("/") else f"{base.rstrip('/')}/{p}")
    lab = spark.createDataFrame(
        [(p, r[label_col], s) for p, r, s in zip(paths, rows, split, strict=True)], "npath string, label string, split string"
    )
    return images.select("image_id", normalise_path(F.col("path")).alias("npath")).join(lab, "npath").select("image_id", "label", "split")


def ground_truth(spark, images, labels: str, labels_base: str | None, output_root: str):
    """The ``(image_id, label, split)`` DataFrame for ``evaluate.labels``."""
    if labels == "folders":
        return from_folders(images)
    if labels == "groups":
        from cbir_lib.sample import GROUPS_FILE, images_dir

        sample = fs.join(output_root, "sample")
        return from_csv(spark, images, fs.join(sample, GROUPS_FILE), labels_base or images_dir(_norm(sample)))
    return from_csv(spark, images, labels if "://" in labels or labels.startswith("/") else os.path.abspath(labels), labels_base)

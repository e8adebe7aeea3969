"""An index's store in layers: the rows of earlier snapshots referenced, not copied.

An incremental build (:mod:`cbir_lib.index.incremental`) changes a few percent of the
store. Copying the other rows into a new ``store/`` every night made the night's write
grow with the collection: at 500k x 1,280 the copy was 10-13 s of a 43-46 s night, and at
100M x 1,280 it would write 512 GB a night to record ~1 % of change. So a night instead
records its change as a layer over its base:

- layer 0 is the ``store/`` of a full build (or of a night that compacted the layers);
- each later layer is a night's ``added/`` rows (the store's columns, in ``(cell,
  image_id)`` order) and the ids its ``delta/`` names ``removed``.

A row of layer ``i`` is live unless a later layer removed its id: a changed image's new
version (layer ``i``) outlives the removal of its old one (listed by layer ``i`` itself),
and an image deleted and later added again lives in the later layer. The manifest lists
the earlier layers' runs with their commit ids (``store_layers``); the snapshot's own
``added/`` and ``delta/`` are the last layer. Readers check each layer's commit id, so a
base run replaced since (a rerun of that run id) is refused, not read. A build that would
pass ``index.max_store_layers`` layers writes the whole store again (compaction), as every
full build does.

Readers: :func:`layers_of` (the driver), then :func:`parts_of` for tasks that read the
Parquet files themselves with :func:`read_parts`, or :func:`frame_of` for a Spark plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbir_lib.common import fs, remote, tables
from cbir_lib.index.store import STORE

# The manifest's list of the earlier layers' runs ({"run_id", "commit_id"}, oldest first).
LAYERS = "store_layers"
# A night's own folders: its added store rows, and (image_id, kind, cell) of its change.
ADDED = "added"
DELTA = "delta"

_NONE = np.zeros(0, np.int64)


class LayerMissing(FileNotFoundError):
    """A layer of an index's store is gone or was replaced since the index was built."""


@dataclass(frozen=True)
class Layer:
    run_id: str
    rows_uri: str | None  # the folder of the layer's rows (None: the night added none)
    removed: np.ndarray  # the ids this layer removed from the earlier ones (sorted)
    drop: np.ndarray  # the ids later layers removed: this layer's rows that are not live (sorted)


def removed_ids(spark, delta_uri: str) -> np.ndarray:
    """The ids a night's ``delta/`` names ``removed``, sorted."""
    import pyarrow.compute as pc

    files = remote.settings_from_hadoop(spark)
    out = [_NONE]
    for u in tables.part_uris(spark, delta_uri):
        t = remote.read_parquet(files, u, ["image_id", "kind"])
        out.append(t.filter(pc.equal(t.column("kind"), "removed")).column("image_id").to_numpy().astype(np.int64))
    return np.unique(np.concatenate(out))


def layers_of(spark, manifest: dict) -> list[Layer]:
    """The layers of the store of index snapshot ``manifest`` (as
    :func:`~cbir_lib.index.store.load_index_manifest` returns it, with its ``uri``), oldest
    first. A snapshot with one ``store/`` is one layer."""
    own = manifest["uri"]
    earlier = manifest.get(LAYERS) or []
    if not earlier:
        return [Layer(manifest["run_id"], fs.join(own, STORE), _NONE, _NONE)]
    table = own.rsplit("/run=", 1)[0]
    rows: list[tuple[str, str | None, np.ndarray]] = []
    for i, entry in enumerate([*earlier, None]):
        if entry is None:
            run_id, run_dir, m = manifest["run_id"], own, manifest
        else:
            run_id, run_dir = entry["run_id"], tables.run_dir(table, entry["run_id"])
            m = tables.read_manifest(spark, table, run_id)
            if m is None or m.get("commit_id") != entry.get("commit_id"):
                raise LayerMissing(
                    f"index {manifest['run_id']}: its store builds on run {run_id} (commit {entry.get('commit_id')}), which is "
                    f"{'gone' if m is None else 'replaced by commit ' + str(m.get('commit_id'))}; "
                    "build the index again with index.mode=full"
                )
        if i == 0:
            rows.append((run_id, fs.join(run_dir, STORE), _NONE))
        else:
            rows.append((run_id, fs.join(run_dir, ADDED) if m.get("added") else None, removed_ids(spark, fs.join(run_dir, DELTA))))
    out, later = [], _NONE
    for run_id, uri, removed in reversed(rows):
        out.append(Layer(run_id, uri, removed, later))
        later = np.union1d(later, removed)
    return out[::-1]


def parts_of(spark, layers: list[Layer]) -> tuple[list[str], list[np.ndarray | None] | None]:
    """Each layer's Parquet parts, and per part the ids to drop from it (None: none; the
    parts of one layer share one array), or None for the drops where no part drops any."""
    uris: list[str] = []
    drops: list[np.ndarray | None] = []
    for layer in layers:
        if layer.rows_uri is None:
            continue
        parts = tables.part_uris(spark, layer.rows_uri)
        uris += parts
        drops += [layer.drop if layer.drop.size else None] * len(parts)
    return uris, drops if any(d is not None for d in drops) else None


def live(ids: np.ndarray, drop: np.ndarray | None) -> np.ndarray | None:
    """The positions of ``ids`` not in ``drop`` (sorted), or None where every row is live."""
    if drop is None or not drop.size or not len(ids):
        return None
    at = np.minimum(np.searchsorted(drop, ids), drop.size - 1)
    keep = drop[at] != ids
    return None if keep.all() else np.flatnonzero(keep)


def read_parts(files, uris: list[str], drops: list | None, columns: list[str] | None = None):
    """The live rows of the parts ``uris`` (``drops`` from :func:`parts_of`, or None), as one
    Arrow table."""
    import pyarrow as pa

    tables_ = []
    for i, u in enumerate(uris):
        t = remote.read_parquet(files, u, columns)
        drop = drops[i] if drops else None
        if drop is not None:
            keep = live(t.column("image_id").to_numpy(), drop)
            if keep is not None:
                t = t.take(pa.array(keep))
        tables_.append(t)
    return pa.concat_tables(tables_) if tables_ else None


def frame_of(spark, layers: list[Layer]):
    """The live rows of the layers as one Spark DataFrame (the store's columns)."""
    from cbir_lib.common.frames import id_frame

    out = None
    for layer in layers:
        if layer.rows_uri is None:
            continue
        df = spark.read.parquet(layer.rows_uri)
        if layer.drop.size:
            from pyspark.sql import functions as F

            df = df.join(F.broadcast(id_frame(spark, layer.drop)), "image_id", "left_anti")
        out = df if out is None else out.unionByName(df, allowMissingColumns=False)
    return out


def with_night(layers: list[Layer], run_id: str, rows_uri: str | None, removed: np.ndarray) -> list[Layer]:
    """The layers after a night that adds the rows under ``rows_uri`` and removes the ids
    ``removed`` (sorted) from the layers before it."""
    removed = np.unique(np.asarray(removed, np.int64))
    earlier = [Layer(x.run_id, x.rows_uri, x.removed, np.union1d(x.drop, removed)) for x in layers]
    return [*earlier, Layer(run_id, rows_uri, removed, _NONE)]


def next_layers(prev: dict, max_layers: int, n_layers: int) -> list[dict] | None:
    """The ``store_layers`` of a night built on index ``prev`` whose store has ``n_layers``
    layers, or None where the night writes the whole store (``index.max_store_layers``
    reached, or 0: never layered)."""
    if max_layers < 2 or n_layers + 1 > max_layers:
        return None
    return [*(prev.get(LAYERS) or []), {"run_id": prev["run_id"], "commit_id": tables.commit_of(prev)}]

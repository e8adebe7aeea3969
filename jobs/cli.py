"""``cbir``: one command with a subcommand per stage; each runs the stage's job shell.

cbir demo                      # sample -> ingest -> extract -> index -> neighbours
cbir ingest --images DIR       # any directory or Hadoop URI
cbir extract --config conf/default.yaml extract.pooling=gem
cbir build_index index.metric=angular index.n_trees=16
cbir neighbors neighbors.k=10 neighbors.min_recall=0.95
cbir evaluate evaluate.mode=split evaluate.labels=folders
cbir dedup dedup.phash_threshold=8 dedup.min_score=0.9
cbir train train.bits=48 && cbir extract extract.head=output/models
cbir query IMAGE [--k 10] [--html out.html]
cbir pipeline --stages build_index,neighbors   # several stages in one Spark session
cbir sql --output out "SELECT * FROM neighbors_by_path LIMIT 10"   # DuckDB over the latest snapshots
cbir serve --output out [--port 8080]   # a local search page (127.0.0.1, read-only)
cbir sample DIR                # write the embedded sample photos to DIR
"""

from __future__ import annotations

import importlib
import sys

if __package__ in (None, ""):  # run as a file (python jobs/cli.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

STAGES = {
    "demo": ".demo",
    "ingest": ".ingest",
    "extract": ".extract",
    "build_index": ".build_index",
    "index": ".build_index",
    "neighbors": ".neighbors",
    "evaluate": ".evaluate",
    "dedup": ".dedup",
    "train": ".train",
    "query": ".query",
    "pipeline": ".pipeline",
    "sql": ".sql",
    "serve": ".serve",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nsubcommands: " + ", ".join([*STAGES, "sample"]))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "sample":
        from cbir_lib.sample import make_sample

        if len(rest) != 1:
            print("usage: cbir sample DIR", file=sys.stderr)
            return 2
        print(make_sample(rest[0]))
        return 0
    if command not in STAGES:
        print(f"cbir: unknown subcommand {command!r}; one of {', '.join([*STAGES, 'sample'])}", file=sys.stderr)
        return 2
    from cbir_lib.common.lease import ConcurrentRun
    from cbir_lib.config import ConfigError
    from cbir_lib.features.run import ExtractFailed
    from cbir_lib.images.run import IngestFailed
    from cbir_lib.index.store import IndexMismatch
    from cbir_lib.neighbors.run import RecallTooLow
    from cbir_lib.query import QueryError
    from cbir_lib.sql.views import NoRuns

    try:
        importlib.import_module(STAGES[command], __package__).main(rest)
    except ConfigError as exc:
        print(f"cbir {command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except IndexMismatch as exc:
        print(f"cbir {command}: index mismatch: {exc}", file=sys.stderr)
        return 2
    except QueryError as exc:
        print(f"cbir {command}: {exc}", file=sys.stderr)
        return 1
    except (RecallTooLow, ExtractFailed, IngestFailed, ConcurrentRun, NoRuns) as exc:  # a gate the run failed: its reason, not a traceback
        print(f"cbir {command}: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"cbir {command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

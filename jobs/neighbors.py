"""spark-submit jobs/neighbors.py --config conf/default.yaml [section.field=value ...]

Every image's top-k neighbours over the latest index, with recall@k measured against
exact search on a sample, into ``neighbors/run=<id>/`` (and ``pairs/`` when asked).
Resumable: a killed run, started again, skips every chunk of queries already committed.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/neighbors.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import stage_main

HEADLINE = ("index_run_id", "method", "nprobe", "k", "recall_at_k", "mode")


def main(argv: list[str] | None = None) -> dict:
    return stage_main("neighbors", __doc__, argv, "cbir_lib.neighbors.run:run_neighbors", HEADLINE)


if __name__ == "__main__":
    main(sys.argv[1:])

"""spark-submit jobs/build_index.py --config conf/default.yaml [section.field=value ...]

Partitions the latest embeddings into balanced IVF cells (or hash cells), writes the
cell-sorted store, builds one Annoy forest per cell on the executors, and commits it all
with its manifest as ``index/run=<id>/`` under ``run.output_root``.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/build_index.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import stage_main

HEADLINE = ("embeddings_run_id", "metric", "n_cells", "mode", "build_seconds")


def main(argv: list[str] | None = None) -> dict:
    return stage_main("build_index", __doc__, argv, "cbir_lib.index.run:run_build_index", HEADLINE)


if __name__ == "__main__":
    main(sys.argv[1:])

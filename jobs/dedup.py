"""spark-submit jobs/dedup.py --config conf/default.yaml [section.field=value ...]

Near-duplicate clusters: exact content hashes, perceptual-hash pairs within a Hamming
threshold (multi-index, not all pairs) and/or embedding pairs above a score, joined into
connected components on Spark; ``dedup/run=<id>/clusters`` and ``pairs``.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/dedup.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import stage_main

HEADLINE = ()


def main(argv: list[str] | None = None) -> dict:
    return stage_main("dedup", __doc__, argv, "cbir_lib.dedup.run:run_dedup", HEADLINE)


if __name__ == "__main__":
    main(sys.argv[1:])

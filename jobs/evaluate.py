"""spark-submit jobs/evaluate.py --config conf/default.yaml [section.field=value ...]

Retrieval quality of the latest run against ground truth (class folders, a labels CSV,
or the demo sample's groups): precision@k, mAP@k, full mAP (split mode), recall@k, the
N-S score, per class; written to ``evaluation/run=<id>/`` as Parquet, metrics.json and
an HTML report.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/evaluate.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import stage_main

HEADLINE = ("mode", "metrics", "report")


def main(argv: list[str] | None = None) -> dict:
    return stage_main("evaluate", __doc__, argv, "cbir_lib.evaluate.run:run_evaluate", HEADLINE)


if __name__ == "__main__":
    main(sys.argv[1:])

"""spark-submit jobs/ingest.py --config conf/default.yaml [--images DIR_OR_URI] [section.field=value ...]

Builds or incrementally updates the images table under ``run.output_root``.
Without ``--images`` (and without ``ingest.images``) it ingests the embedded sample.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/ingest.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import sample_dir_for, stage_main


def _ingest(spark, cfg) -> dict:
    from cbir_lib.images.run import run_ingest

    return run_ingest(spark, cfg, cfg.ingest.images or sample_dir_for(cfg))


def main(argv: list[str] | None = None) -> dict:
    return stage_main("ingest", __doc__, argv, _ingest, shorthands={"images": "ingest.images"})


if __name__ == "__main__":
    main(sys.argv[1:])

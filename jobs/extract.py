"""spark-submit jobs/extract.py --config conf/default.yaml [section.field=value ...]

Embeds the latest images snapshot into the embeddings table under ``run.output_root``.
Resumable: a killed run, started again, skips every chunk already committed.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/extract.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import stage_main

HEADLINE = ("images_per_second",)


def main(argv: list[str] | None = None) -> dict:
    return stage_main("extract", __doc__, argv, "cbir_lib.features.run:run_extract", HEADLINE)


if __name__ == "__main__":
    main(sys.argv[1:])

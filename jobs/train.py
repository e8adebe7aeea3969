"""spark-submit jobs/train.py --config conf/default.yaml [section.field=value ...]

Trains the head of Lin et al. (hidden layer, B sigmoid code units, classifier) on the
labelled embeddings, fed from Parquet to tf.data by Petastorm, into
``models/run=<id>/`` (model.keras, head.npz, manifest). Apply it with
``cbir extract extract.head=<output_root>/models``.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/train.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import stage_main

HEADLINE = ("mode", "bits", "metrics")


def main(argv: list[str] | None = None) -> dict:
    return stage_main("train", __doc__, argv, "cbir_lib.finetune.run:run_train", HEADLINE)


if __name__ == "__main__":
    main(sys.argv[1:])

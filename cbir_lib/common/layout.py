"""The output root's layout: the name of every table and the stage that writes it.

Each table lives at ``<output_root>/<name>/`` with its snapshots under ``run=<id>/`` and
the ``_LATEST`` pointer (:mod:`cbir_lib.common.tables`). Stages, ``cbir query``, ``cbir
train`` and the SQL views name tables through these constants, never a string of their own.
"""

from __future__ import annotations

IMAGES = "images"
EMBEDDINGS = "embeddings"
INDEX = "index"
NEIGHBORS = "neighbors"
PAIRS = "pairs"
DEDUP = "dedup"
EVALUATION = "evaluation"
MODELS = "models"

# table -> the stage (job) that writes it, in the order of the flow
PRODUCER = {IMAGES: "ingest", EMBEDDINGS: "extract", INDEX: "build_index", NEIGHBORS: "neighbors", PAIRS: "neighbors",
            DEDUP: "dedup", EVALUATION: "evaluate", MODELS: "train"}
TABLES = tuple(PRODUCER)

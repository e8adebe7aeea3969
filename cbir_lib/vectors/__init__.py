"""The bottom layer every stage imports downward: pure numpy on vectors and binary codes.

- :mod:`cbir_lib.vectors.topk`: metric preparation, scores, exact and merged top-k, recall;
- :mod:`cbir_lib.vectors.codes`: packed binary codes and 64-bit hashes, their Hamming
  distances (one popcount table), and the multi-index that finds codes within a radius.

Nothing here imports a stage, Spark or TensorFlow (``tests/test_layers.py``).
"""

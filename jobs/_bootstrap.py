"""Lets ``spark-submit jobs/<stage>.py`` import ``jobs`` and ``cbir_lib`` from a checkout
that is not pip-installed: the project root goes on ``sys.path``."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

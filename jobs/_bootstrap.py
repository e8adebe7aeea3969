"""Lets a job shell run as a file (``spark-submit jobs/<stage>.py``) from a checkout that
is not pip-installed: the project root goes on ``sys.path``, and the shell names ``jobs``
its package (PEP 366) so that its relative imports (``from ._common import ...``) work.

Installed, the shells are the package ``cbir_jobs`` (setup.cfg), which puts no generic
top-level name such as ``jobs`` into site-packages; in a checkout they are ``jobs``."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
PACKAGE = "jobs"

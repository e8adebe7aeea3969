"""What an install puts into site-packages: every library package, and the job shells as
``cbir_jobs``, never a generic top-level name such as ``jobs`` (issue 23). Pure: reads
setup.cfg and the tree; the installed console script is checked where it is installed."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _options() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["options"]


def _listed(key: str) -> list[str]:
    return [line.strip() for line in _options()[key].splitlines() if line.strip()]


def test_every_library_package_is_installed_and_nothing_generic_at_the_top():
    packages = set(_listed("packages"))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cbir_lib").rglob("__init__.py")}
    assert on_disk <= packages, f"add to setup.cfg [options] packages: {sorted(on_disk - packages)}"
    assert {p.split(".")[0] for p in packages} == {"cbir_lib", "cbir_jobs"}
    assert dict(line.split(" = ") for line in _listed("package_dir")) == {"cbir_jobs": "jobs"}


def test_the_console_script_runs_the_installed_shells():
    scripts = configparser.ConfigParser()
    scripts.read(ROOT / "setup.cfg")
    assert "cbir = cbir_jobs.cli:main" in scripts["options.entry_points"]["console_scripts"]
    cbir = shutil.which("cbir", path=str(Path(sys.executable).parent))
    if cbir is None:
        return  # not installed in this interpreter's environment (make venv installs it)
    out = subprocess.run([cbir, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "subcommands:" in out.stdout, out.stderr[-2000:]


def test_a_shell_runs_as_a_file_from_the_checkout():
    """``spark-submit jobs/<stage>.py`` runs the file: its relative imports must resolve."""
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "extract.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--config" in out.stdout, out.stderr[-2000:]

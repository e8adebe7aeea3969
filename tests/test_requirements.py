"""requirements.in is complete and agrees with the lock: every direct need of the package
(setup.cfg's install_requires) is pinned there, and every pin is the lock's version."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip().split(";")[0].strip()
    return out


def test_every_pin_of_requirements_in_is_the_locks():
    top, lock = _pins(ROOT / "requirements.in"), _pins(ROOT / "requirements.lock")
    assert top, "requirements.in has no pins"
    wrong = {name: (version, lock.get(name)) for name, version in top.items() if lock.get(name) != version}
    assert not wrong, f"requirements.in pin -> lock: {wrong}"


def test_every_direct_need_is_pinned_in_requirements_in():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    needs = [line.split("#", 1)[0].strip() for line in cfg["options"]["install_requires"].splitlines()]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!;\s\[]", n, maxsplit=1)[0].lower()) for n in needs if n}
    top = _pins(ROOT / "requirements.in")
    assert names - set(top) == set(), f"in setup.cfg but not pinned in requirements.in: {sorted(names - set(top))}"

"""`pip install .` (not editable) ships only the packages pyproject.toml lists: every one must be there."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("ringgate", "fastpath", "workers", "shared_state")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"

"""The `selfrank` namespace maps the design's top-level folders; every package folder is in the build."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the suite's interpreter (3.10 only lacks the reader)

REPO = Path(__file__).resolve().parents[1]


def _package_folders() -> set[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    return found


def test_every_package_folder_is_listed_in_the_build():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _package_folders() == listed


def test_a_users_own_train_module_does_not_shadow_ours(tmp_path):
    # A script folder with its own train.py and launch.py: our modules live under `selfrank`.
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "launch.py").write_text("raise SystemExit('the user launch.py was imported')\n")
    done = subprocess.run([sys.executable, "-c", "import selfrank.train.pipeline, selfrank.launch.cli; print('ok')"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

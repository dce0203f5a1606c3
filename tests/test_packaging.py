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
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]


def test_dependencies_are_ranges_that_hold_the_pinned_versions():
    """pyproject states compatible ranges (a user's CUDA torch must satisfy them); constraints.txt pins the
    versions tested together, and each pin must lie inside its range."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    for text in _requirements():
        requirement = Requirement(text)
        assert not any(spec.operator == "==" for spec in requirement.specifier), f"{text}: an exact pin"
        assert any(spec.operator in ("<", "<=", "~=") for spec in requirement.specifier) or \
            requirement.name in ("pytest", "pytest-timeout", "pytest-xdist"), f"{text}: no upper bound"
        pin = pins.get(requirement.name.lower())
        if pin is not None:
            assert requirement.specifier.contains(pin), f"{text} excludes the tested {requirement.name}=={pin}"

"""A complete tiny run shared by the reliability tests (the uninterrupted reference)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.helpers import FAKE_SECRETS, run, write_config


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """``runs/ref`` after an uninterrupted ``selfrank run`` (fake secrets in its environment)."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, "ref")
    started = time.perf_counter()
    result = run(["run", str(config)], cwd=folder, **FAKE_SECRETS)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "ref.log").write_text(result.stdout + result.stderr)
    (folder / "seconds.txt").write_text(f"{time.perf_counter() - started:.1f}")
    return folder / "runs" / "ref"

"""Test-wide settings: offline hub, offline W&B, and the shared real data (WordNet is found where the
set-up put it, inside the environment, as for every user command)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()  # per-save "layers were not sharded" notices
transformers.utils.logging.disable_progress_bar()  # per-load weight bars

# Tiny models run fastest on one intra-op thread, and a second thread contends with ranking workers.
torch.set_num_threads(int(os.environ.get("SELFRANK_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets that sit beside the project (never copied into it)."""
    assert SHARED_DATA.is_dir(), f"real test data missing: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_collection_modifyitems(config, items):
    """Files with end-to-end (``slow``) tests first, the rest after them in their usual order.

    ``make test`` runs files on one worker per core (pytest-xdist, one file per worker at a time): the long
    files started first leave the many short ones to even out the workers' ends, instead of one long file
    starting last while the others have nothing left (measured on 2 cores: 18.8 min in xdist's own order,
    15.8 min long files first). Deterministic, as every worker must collect the same order."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file and test order kept within each group

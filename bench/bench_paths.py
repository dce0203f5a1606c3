"""Where the benchmarks find the shared real data and the models they name, whatever the working directory.

The real datasets live in ``shared/data`` next to the repository (the task configs name
``../shared/data`` relative to the repository root, not to the current directory). A model given by a
packaged short name (``smollm2-135m-instruct``) resolves as ``model.name`` does in a run: to its converted
``save_pretrained`` folder (converted once, then cached).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def data_path(path: str | Path, what: str = "--data") -> Path:
    """``path`` (a folder or file under the shared data, or anywhere) if it exists; else a one-line exit."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SystemExit(f"{what} {path}: not found (the real datasets are expected in {DATA})")
    return path


def model_folder(name: str, what: str = "--model") -> Path:
    """The ``save_pretrained`` folder ``name`` stands for: a packaged short name through the project's
    resolver, or a local folder; a hub name is refused (benchmarks run offline)."""
    sys.path.insert(0, str(REPO))
    from selfrank.errors import UserError
    from selfrank.train.models.pretrained import resolve_model_source

    try:
        folder = Path(resolve_model_source(name)).expanduser()
    except UserError as exc:
        raise SystemExit(f"{what} {name}: {exc}") from None
    if not folder.is_dir():
        raise SystemExit(f"{what} {name}: neither a packaged model name nor a save_pretrained folder")
    return folder

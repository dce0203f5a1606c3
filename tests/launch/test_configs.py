"""Every shipped experiment YAML loads, and states only what differs from the typed defaults (one place
for a default: train/config.py and ranking/config.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from selfrank.launch.config import load_experiment, load_yaml
from selfrank.train.config import ExperimentConfig

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")
                 if not p.name.startswith("grid_"))


def restated_defaults(data: dict, default, prefix: str = "") -> list[str]:
    """Keys of ``data`` whose value equals the default's, recursing into nested dataclasses."""
    found = []
    for key, value in data.items():
        where = f"{prefix}{key}"
        current = getattr(default, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            found += restated_defaults(value, current, where + ".")
        elif value == current or (isinstance(current, (list, tuple)) and list(value or []) == list(current)):
            found.append(where)
    return found


def test_the_check_finds_a_restated_default():
    assert restated_defaults({"seed": 0, "ppo": {"steps": 1, "lr": ExperimentConfig().ppo.lr}}, ExperimentConfig()) \
        == ["seed", "ppo.lr"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_states_only_differences(path):
    load_experiment(path)
    assert restated_defaults(load_yaml(path), ExperimentConfig()) == []


GRIDS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("grid_*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_run_of_a_shipped_grid_loads(path, monkeypatch):
    """A grid's task configs with its overrides: each run's config valid, as `selfrank experiment` loads it."""
    from selfrank.launch.experiment import load_grid

    monkeypatch.chdir(path.parents[1])  # grids name their task configs relative to the repository
    grid = load_grid(path)
    assert grid.tasks and grid.seeds
    for task in grid.tasks:
        config = load_experiment(task, [*grid.overrides, f"seed={grid.seeds[0]}"])
        assert config.variants
    assert set(grid.agreement_sweep.tasks) <= {Path(t).stem for t in grid.tasks}

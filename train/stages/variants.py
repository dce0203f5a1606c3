"""The loop that trains one model per STR variant (``variants:``; what each is: ``train.config.VARIANTS``)."""
from __future__ import annotations

from typing import Callable

from selfrank.train import dist
from selfrank.train.config import ExperimentConfig
from selfrank.train.rundir import RunDir
from selfrank.train.seeding import seed_everything


def per_variant(config: ExperimentConfig, run: RunDir, name: str, train_one: Callable[[str, str], dict],
                variants: list[str] | None = None) -> dict:
    """Run ``train_one(variant, stage)`` for each STR variant whose ``<name>/<variant>`` is not complete
    (``variants``: those of ``config.variants`` this stage trains; default all)."""
    summaries = {}
    for variant in config.variants if variants is None else variants:
        stage = f"{name}/{variant}"
        if run.is_done(stage):
            summaries[variant] = run.summary(stage)
            continue
        seed_everything(config.seed)
        summaries[variant] = train_one(variant, stage)
        if dist.is_main():
            run.mark_done(stage, summaries[variant])
    return {"variants": summaries}

"""The reward stage with ``reward.model`` set: a ready reward model instead of a trained one.

The model (any one-label ``AutoModelForSequenceClassification`` folder or hub name) is loaded, checked
against the policy's tokenizer (PPO scores the policy's token ids directly), scored on the held-out
preference pairs (the same split a trained model is measured on, so the figures compare) and normalised
on the reference policy's samples like a trained one; then written as this run's
``reward/<variant>/model``, so PPO, the answer tables and eval read it as any other. Collective.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from selfrank.errors import UserError

from selfrank.train import dist
from selfrank.train.config import ExperimentConfig
from selfrank.train.data.preferences import heldout_prompts, load_pairs, load_ranked, split_pairs
from selfrank.train.dist.stage_setup import begin_training, end_training, stage_cost
from selfrank.train.models.causal_lm import load_tokenizer
from selfrank.train.models.reward_interop import reward_model_from_classifier

log = logging.getLogger(__name__)


def _check_tokenizer(rm, sft_folder: Path, name: str) -> None:
    policy = load_tokenizer(sft_folder)
    other = rm.tokenizer
    if (len(other) != len(policy) or other.pad_token_id != policy.pad_token_id
            or other.eos_token_id != policy.eos_token_id or other.get_vocab() != policy.get_vocab()):
        raise UserError(f"reward.model: {name}: its tokenizer differs from the policy's ({sft_folder}); PPO "
                        "scores the policy's token ids directly, so both must share one tokenizer")
    if other.pad_token_id is None:
        raise UserError(f"reward.model: {name}: the tokenizer needs a pad token for reward-model batches")


def import_reward(config: ExperimentConfig, sft_folder: Path, pairs_path: Path, ranked_path: Path,
                  out_folder: Path, *, use_noise: bool, normalize_prompts: list[str],
                  normalize_responses: list[str]) -> dict:
    """Load ``config.reward.model``, measure and normalise it, save it to ``out_folder``; returns the
    stage summary (``imported_from``, ``steps`` 0)."""
    from selfrank.train.stages.reward import _evaluate_and_normalize

    name = config.reward.model
    cfg = config.reward
    started = time.monotonic()
    acc = begin_training(1, 1, config.model.mixed_precision)
    with dist.whole_weights(acc):
        rm = reward_model_from_classifier(name, config.model)
    _check_tokenizer(rm, sft_folder, name)
    pairs = load_pairs(pairs_path)
    groups = load_ranked(ranked_path)
    heldout = heldout_prompts([p.prompt for p in pairs] + [g.prompt for g in groups], cfg.heldout_fraction,
                              config.seed)
    _, heldout_pairs = split_pairs(pairs, heldout)
    rm = dist.autocast_forward(rm.to(acc.device).eval(), acc)  # model.mixed_precision, as a trained RM scores
    # Nothing is trained, so every pair is unseen: "train" accuracy is left out, held-out as usual.
    summary = _evaluate_and_normalize(rm, rm.tokenizer, config, [], heldout_pairs, use_noise, normalize_prompts,
                                      normalize_responses, max(cfg.batch_size, 32), acc)
    summary = {"imported_from": name, "trained": False, "steps": 0, "use_noise": use_noise,
               "heldout_pairs": len(heldout_pairs), "heldout_prompts": len(heldout), **summary}
    dist.save_on_main(lambda: rm.save_pretrained(out_folder), acc)
    end_training(acc)
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary.update(stage_cost(summary["seconds"], acc.num_processes))
    summary["model"] = str(out_folder)
    log.info("reward: imported %s (no training), held-out accuracy %s", name, summary["heldout_accuracy"])
    return summary

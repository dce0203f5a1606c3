"""Eval stage: score each system (original, SFT, baselines, STR variants) on the test examples.

For every row the model answers each test prompt ``eval.samples_per_prompt`` times (once by default),
with the decoding of ``config.eval`` (the paper's sampling by default; seeded identically for every
row, so that rows differ by their model and not by their random draws); an example's score is the mean
over its answers. Outputs in the eval folder: ``generations_<row>.jsonl`` (answer and
per-example scores), ``agreement_groups.jsonl`` (the ranking study's groups) and the report
(``train.evaluation.report``). The ranking study samples ``eval.agreement_group_size`` answers per prompt from
the SFT model and compares each reward model's order, and TextRank's, with the METEOR order
(``train.evaluation.agreement``).
"""
from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from selfrank.atomic import write_jsonl
from selfrank.ranking.engine import stable_seed
from selfrank.errors import UserError
from selfrank.jsonl import read_jsonl

from selfrank.train.evaluation.agreement import AgreementGroup, agreement_study
from selfrank.train.evaluation.controls import GREEDY_ROW, MAJORITY_ROW, greedy_twin, majority_answers, paired_sets
from selfrank.train.config import ExperimentConfig
from selfrank.train.evaluation.metrics import EXACT_ANSWER_TASKS, QA_METRICS, TEXT_METRICS, bootstrap_ci, corpus_bleu, meteor, paired_bootstrap_diff, score_examples, tokenize
from selfrank.train.evaluation.report import CURVE_KEYS, write_report
from selfrank.train.progress import StepProgress

log = logging.getLogger(__name__)

BASELINE_ROW = "sft"
TEXTRANK = "textrank"


def example_references(example, task_kind: str, unanswerable: str) -> list[str]:
    """Gold answers of one example: its references, else its target; QA "no answer" becomes the
    unanswerable target string (which the SQuAD scorer reads as no-answer)."""
    refs = [r for r in (example.references or []) if isinstance(r, str) and r.strip()]
    if not refs and isinstance(example.target, str) and example.target.strip():
        refs = [example.target]
    if not refs:
        if task_kind != "qa":
            raise UserError(f"test example {example.id}: no reference answer to score against")
        refs = [unanswerable]
    return refs


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _free_memory() -> None:
    """Collect a model the caller has just deleted (rows are evaluated one model at a time)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def answer_seeds(seed: int, start: int, count: int, n: int) -> list[int]:
    """Sampling seeds of the ``n`` answers to each of prompts ``start..start+count-1``: from the seed and
    the answer's place alone, so answers depend neither on the batching nor on the number of processes."""
    return [stable_seed("eval", seed, i, j) for i in range(start, start + count) for j in range(n)]


def generate_batches(config: ExperimentConfig, folder: Path, prompts: Sequence[str], *, n: int, per_call: int,
                     seed: int, decoding: dict, desc: str, group=None) -> list[str]:
    """``n`` answers per prompt from the model in ``folder``, ``per_call`` prompts per generate() call.

    Answer ``j`` of prompt ``i`` is seeded by ``(seed, i, j)`` alone (:func:`answer_seeds`), so the
    answers do not depend on the batching nor on the number of processes: under a launcher (``group``:
    a process group) call ``i`` runs on rank ``i % world`` and every rank gets all answers back in
    prompt order. Collective then."""
    from selfrank.train import dist
    from selfrank.train.models.causal_lm import load_model
    from selfrank.train.sampling.generation import generate

    starts = list(range(0, len(prompts), per_call))
    mine = dist.round_robin(starts) if group is not None else list(enumerate(starts))
    model, tokenizer = load_model(Path(folder), config.model)
    model.to(_device()).eval()
    model = dist.autocast_forward(model, dist.get_accelerator())  # model.mixed_precision, as in training
    done: list[tuple[int, list[str]]] = []
    for index, start in StepProgress(desc, len(mine), iterable=mine, unit="batch"):
        chunk = list(prompts[start:start + per_call])
        generation = generate(model, tokenizer, chunk, n=n, seeds=answer_seeds(seed, start, len(chunk), n),
                              batch_size=config.eval.batch_size, method=config.eval.sampler, **decoding)
        done.append((index, [t.strip() for t in generation.texts]))
    del model, tokenizer
    _free_memory()
    if group is not None:
        done = dist.gather_lists(done, group)
    return [text for _, texts in sorted(done) for text in texts]


def _eval_decoding(config: ExperimentConfig) -> dict:
    ev = config.eval
    return {"do_sample": ev.do_sample, "temperature": ev.temperature, "top_p": ev.top_p,
            "max_new_tokens": ev.max_new_tokens}


def answer_examples(config: ExperimentConfig, folder: Path, prompts: Sequence[str], desc: str,
                    group=None) -> list[str]:
    """``eval.samples_per_prompt`` answers per prompt (answer ``j`` of prompt ``i`` at ``i * n + j``) from
    the model in ``folder``, with ``config.eval`` decoding."""
    return generate_batches(config, folder, prompts, n=config.eval.samples_per_prompt,
                            per_call=config.eval.batch_size, seed=config.eval.seed,
                            decoding=_eval_decoding(config), desc=desc, group=group)


def example_means(scores: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Per-answer scores (``n`` consecutive answers per example) -> each example's mean score."""
    return {m: values.reshape(-1, n).mean(1) for m, values in scores.items()}


def _ci(values: np.ndarray, config: ExperimentConfig) -> dict:
    mean, low, high = bootstrap_ci(values, config.eval.bootstrap, config.eval.confidence, config.eval.seed)
    return {"mean": mean, "low": low, "high": high}


def read_curves(path: Path) -> dict:
    """``step``, ``reward/mean`` and ``objective/kl`` columns of a PPO ``log.jsonl`` (missing -> None)."""
    columns: dict[str, list] = {"step": [], **{key: [] for key in CURVE_KEYS}}
    for number, row in read_jsonl(path):
        if "step" not in row:
            raise UserError(f"{path}:{number}: PPO log row without 'step'")
        columns["step"].append(row["step"])
        for key in CURVE_KEYS:
            value = row.get(key)
            columns[key].append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None)
    return columns


def sample_groups(config: ExperimentConfig, model_folder: Path, prompts: Sequence[str], k: int,
                  desc: str = "agreement samples", group=None) -> list[list[str]]:
    """``k`` answers per prompt from one model, with the sample stage's decoding and eval's seeds."""
    ev = config.eval
    decoding = {"do_sample": True, "temperature": config.sample.temperature, "top_p": config.sample.top_p,
                "max_new_tokens": ev.max_new_tokens}
    texts = generate_batches(config, model_folder, prompts, n=k, per_call=max(1, ev.batch_size // k),
                             seed=ev.seed + 1, decoding=decoding, desc=desc, group=group)
    return [texts[j * k:(j + 1) * k] for j in range(len(prompts))]


def study_prompts(config: ExperimentConfig, examples: Sequence) -> list[int]:
    """The indices of the test examples the ranking study uses (seeded, sorted)."""
    ev = config.eval
    rng = np.random.default_rng(ev.seed)
    count = min(ev.agreement_groups, len(examples))
    return sorted(rng.choice(len(examples), size=count, replace=False).tolist())


def agreement_groups(config: ExperimentConfig, sft_folder: Path, examples: Sequence, references: list[list[str]],
                     reward_folders: dict[str, Path], group=None) -> list[AgreementGroup] | None:
    """Sample groups of answers from the SFT model, rank them (TextRank + ISODATA), score them with
    every reward model and with METEOR against the gold references. Under a launcher the sampling is
    shared out (``group``) and the rest runs on the main process (None elsewhere)."""
    from selfrank.train import dist
    from selfrank.ranking.ranker import Ranker

    ev = config.eval
    picked = study_prompts(config, examples)
    prompts = [examples[i].prompt for i in picked]
    answers = sample_groups(config, sft_folder, prompts, ev.agreement_group_size, group=group)
    if not dist.is_main():
        return None
    raw = [{"id": examples[i].id, "prompt": prompts[j], "responses": answers[j]} for j, i in enumerate(picked)]
    ranked = Ranker(config.ranking).rank(raw)
    groups = [AgreementGroup(id=r.id, ref_scores=[meteor(resp, references[i]) for resp in r.responses],
                             scores={TEXTRANK: [float(s) for s in r.scores]},
                             representatives=[int(x) for x in r.representatives],
                             meta={"prompt": r.prompt, "responses": list(r.responses),
                                   "clusters": [int(c) for c in r.clusters]})
              for r, i in zip(ranked, picked)]

    flat_prompts = [g.meta["prompt"] for g in groups for _ in g.meta["responses"]]
    flat_responses = [resp for g in groups for resp in g.meta["responses"]]
    for name, folder in (reward_folders or {}).items():
        values = reward_scores(config, folder, flat_prompts, flat_responses)
        offset = 0
        for g in groups:
            size = len(g.meta["responses"])
            g.scores[f"reward:{name}"] = [float(v) for v in values[offset:offset + size]]
            offset += size
    return groups


def reward_scores(config: ExperimentConfig, folder: Path, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """The normalised rewards of ``(prompt, response)`` pairs by the reward model in ``folder``."""
    from selfrank.train import dist
    from selfrank.train.models.reward_model import RewardModel, score

    rm = dist.autocast_forward(RewardModel.from_pretrained(folder, config.model).to(_device()),
                               dist.get_accelerator())  # model.mixed_precision, as in training
    values = score(rm, rm.tokenizer, list(prompts), list(responses), batch_size=config.eval.batch_size,
                   max_length=config.reward.max_length, normalized=True)
    del rm
    _free_memory()
    return values


def rerank_rows(config: ExperimentConfig, prompts: Sequence[str], candidates: list[list[str]],
                reward_folders: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """Best of K by each variant's reward model, at inference, with no PPO: of the SFT model's K sampled
    answers to each prompt (the majority vote's), the one its reward model scores highest (ties: the
    earliest). Isolates the reward signal from PPO. ``(row sft_rerank_<variant>, answers, decoding)``."""
    flat_prompts = [prompt for prompt, group in zip(prompts, candidates) for _ in group]
    flat = [answer for group in candidates for answer in group]
    rows = []
    for variant, folder in reward_folders.items():
        values = reward_scores(config, folder, flat_prompts, flat)
        picked, offset = [], 0
        for group in candidates:
            picked.append(group[int(np.argmax(values[offset:offset + len(group)]))])
            offset += len(group)
        rows.append((f"sft_rerank_{variant}", picked, f"best of {len(candidates[0]) if candidates else 0} "
                     f"sampled by the {variant} reward model"))
    return rows


def control_rows(config: ExperimentConfig, sft_folder: Path, prompts: Sequence[str],
                 group=None) -> list[tuple[str, list[str], str, list[list[str]] | None]]:
    """The control rows (``train.evaluation.controls``) as ``(row, one answer per prompt, decoding, the
    answers each was picked from)``:
    SFT greedy (left out when eval itself decodes greedily: it would be the SFT row again) and SFT
    majority vote over K answers sampled with the sample stage's decoding."""
    ev = config.eval
    rows = []
    if ev.do_sample:
        greedy = generate_batches(config, sft_folder, prompts, n=1, per_call=ev.batch_size, seed=ev.seed,
                                  decoding={"do_sample": False, "max_new_tokens": ev.max_new_tokens},
                                  desc="eval SFT greedy", group=group)
        rows.append((GREEDY_ROW, greedy, "greedy", None))
    k = ev.majority_samples or config.sample.samples_per_prompt
    decoding = {"do_sample": True, "temperature": config.sample.temperature, "top_p": config.sample.top_p,
                "max_new_tokens": ev.max_new_tokens}
    sampled = generate_batches(config, sft_folder, prompts, n=k, per_call=max(1, ev.batch_size // k),
                               seed=ev.seed + 2, decoding=decoding, desc="eval SFT majority", group=group)
    groups = [sampled[i:i + k] for i in range(0, len(sampled), k)]
    rows.append((MAJORITY_ROW, majority_answers(sampled, k), f"majority of {k} sampled (temperature "
                 f"{config.sample.temperature}, top-p {config.sample.top_p})", groups))
    return rows


def evaluate_rows(config: ExperimentConfig, rows: list[tuple[str, Path]], examples: list, out_folder: Path, *,
                  reward_folders: dict[str, Path] | None = None, ppo_logs: dict[str, Path] | None = None,
                  task_kind: str, group=None, stage_seconds: dict[str, float | None] | None = None,
                  sft_runs: dict[str, dict] | None = None) -> dict | None:
    """Score every ``(name, model folder)`` row on ``examples``, run the ranking study, write the report.

    Returns the results dict that ``train.evaluation.report.write_report`` renders (also saved as ``report.json``).
    Under a launcher (``group``: the job's process group) every process generates a share of each
    row's answers; the main process scores them and writes the report; the others return None.
    ``stage_seconds``: the earlier stages' wall times, reported beside this one's. ``sft_runs``: the SFT
    stage's summary per method, whose learning rates (and any search behind them) the report lists.
    """
    started = time.perf_counter()
    from selfrank.train import dist

    ev = config.eval
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in rows]
    if not rows:
        raise UserError("eval: no model folders to evaluate (run the sft stage first)")
    if len(set(names)) != len(names):
        raise UserError(f"eval: row names must be distinct, got {names}")
    examples = list(examples[: ev.max_examples] if ev.max_examples else examples)
    if not examples:
        raise UserError("eval: the test split has no examples")
    qa = task_kind in EXACT_ANSWER_TASKS
    unanswerable = config.task.unanswerable_target
    references = [example_references(ex, task_kind, unanswerable) for ex in examples]
    prompts = [ex.prompt for ex in examples]
    metric_names = TEXT_METRICS + (QA_METRICS if qa else ())
    n = ev.samples_per_prompt

    results: dict = {
        "task_kind": task_kind, "n_examples": len(examples), "confidence": ev.confidence, "bootstrap": ev.bootstrap,
        "metrics": list(metric_names),
        "decoding": {"do_sample": ev.do_sample, "temperature": ev.temperature, "top_p": ev.top_p,
                     "max_new_tokens": ev.max_new_tokens, "seed": ev.seed, "samples_per_prompt": n},
        "rows": {}, "paired_vs_sft": {}, "agreement": None, "curves": {},
        # How long the gold answers are (metric tokens): the report leaves corpus BLEU out for short ones.
        "reference_tokens": {"median": float(np.median([len(tokenize(r)) for refs in references for r in refs]
                                                        or [0]))},
    }
    per_example: dict[str, dict[str, np.ndarray]] = {}

    def score_row(name: str, folder: Path, texts: list[str], n: int, how: str | None = None,
                  candidates: list[list[str]] | None = None) -> None:
        scores = example_means(score_examples(texts, [refs for refs in references for _ in range(n)], qa=qa,
                                              unanswerable=unanswerable), n)
        per_example[name] = scores
        generations_file = f"generations_{name}.jsonl"
        write_jsonl(out / generations_file, (
            {"id": ex.id, "prompt": ex.prompt, "references": refs,
             **({"generation": texts[i]} if n == 1 else {"generations": texts[i * n:(i + 1) * n]}),
             **({"candidates": candidates[i]} if candidates else {}),
             **{m: float(scores[m][i]) for m in metric_names}}
            for i, (ex, refs) in enumerate(zip(examples, references))))
        results["rows"][name] = {
            "model": str(folder),
            "metrics": {m: _ci(scores[m], config) for m in metric_names},
            "corpus_bleu": corpus_bleu(texts, [refs for refs in references for _ in range(n)]),
            "generations": generations_file,
            **({"decoding": how} if how else {}),
        }
        log.info("eval %s: %s", name, ", ".join(f"{m}={scores[m].mean():.4f}" for m in metric_names))

    for name, folder in StepProgress("eval rows", len(rows), iterable=rows, unit="row"):
        texts = answer_examples(config, folder, prompts, desc=f"eval {name}", group=group)
        if dist.is_main():
            score_row(name, folder, texts, n)

    folders = dict(rows)
    if ev.controls and BASELINE_ROW in folders:
        for name, texts, how, candidates in control_rows(config, folders[BASELINE_ROW], prompts, group):
            if dist.is_main():
                score_row(name, folders[BASELINE_ROW], texts, 1, how, candidates)
                if name == MAJORITY_ROW and reward_folders:  # the same K answers, picked by each reward model
                    for rerank, picked, picked_how in rerank_rows(config, prompts, candidates, reward_folders):
                        score_row(rerank, folders[BASELINE_ROW], picked, 1, picked_how, candidates)

    if ev.controls and ev.do_sample and BASELINE_ROW in folders:  # each STR variant decoding greedily
        for name, folder in [(name, folder) for name, folder in rows if name in config.variants]:
            texts = generate_batches(config, folder, prompts, n=1, per_call=ev.batch_size, seed=ev.seed,
                                     decoding={"do_sample": False, "max_new_tokens": ev.max_new_tokens},
                                     desc=f"eval {name} greedy", group=group)
            if dist.is_main():
                score_row(greedy_twin(name), folder, texts, 1, "greedy")

    if dist.is_main():
        results.update(paired_sets(list(per_example), per_example.__getitem__, lambda a, b: {
            m: paired_bootstrap_diff(a[m], b[m], ev.bootstrap, ev.confidence, ev.seed) for m in metric_names}))

    study = ev.agreement_groups > 0 and BASELINE_ROW in folders
    if study:
        groups = agreement_groups(config, folders[BASELINE_ROW], examples, references, reward_folders or {}, group)
    if not dist.is_main():
        return None
    if study:
        write_jsonl(out / "agreement_groups.jsonl", (
            {"id": g.id, **g.meta, "ref_scores": g.ref_scores, "scores": g.scores,
             "representatives": g.representatives} for g in groups))
        results["agreement"] = {
            "source_row": BASELINE_ROW, "group_size": ev.agreement_group_size, "reference": "meteor",
            **agreement_study(groups, n_resamples=ev.bootstrap, confidence=ev.confidence, seed=ev.seed),
        }
    elif ev.agreement_groups > 0:
        log.warning("eval: no %r row, so no ranking agreement study", BASELINE_ROW)

    for name, path in (ppo_logs or {}).items():
        if Path(path).is_file():
            results["curves"][name] = read_curves(Path(path))
        else:
            log.warning("eval: PPO log %s not found; no curves for %s", path, name)

    results["sft_learning_rates"] = {method: {"lr": summary.get("lr"), "search": summary.get("lr_search")}
                                     for method, summary in (sft_runs or {}).items() if summary.get("lr") is not None}
    results["stage_seconds"] = {**{k: v for k, v in (stage_seconds or {}).items() if isinstance(v, (int, float))},
                                "eval": time.perf_counter() - started}
    write_report(out, results)
    return results

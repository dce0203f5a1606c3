"""evaluate_rows end to end on tiny real models: generations, metrics, paired CIs, agreement, report."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfrank.errors import UserError
from selfrank.train.evaluation import metrics
from selfrank.train.config import EvalConfig, TaskConfig
from selfrank.train.data.examples import Example
from selfrank.train.evaluation.controls import majority_answers, majority_pick
from selfrank.train.evaluation.evaluate import evaluate_rows, example_references, reward_scores
from selfrank.train.models.reward_model import RewardModel

from tests.train.helpers import tiny_config, tiny_policy


def _policy_folder(root, config, seed):
    tiny_policy(root, config, seed=seed)  # saves root / "policy"
    return root / "policy"


def _examples():
    rows = [("the cat sat on the mat", "where did the cat sit", ["on the mat", "the mat"]),
            ("paris is the capital of france", "what is the capital of france", ["Paris"]),
            ("the sky is blue today", "what colour is the sky", ["blue"]),
            ("bob has three apples", "how many apples does bob have", ["three", "3"]),
            ("the river runs to the sea", "is the moon made of cheese", ["unanswerable"]),
            ("the cat sat on the mat", "what sat on the mat", ["the cat"]),
            ("the sky is blue today", "when is the sky blue", ["today"])]
    return [Example(id=f"q{i}", prompt=f"<c> {c} <q> {q} <a>", target=refs[0], references=refs, meta={})
            for i, (c, q, refs) in enumerate(rows)]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    config = tiny_config(
        root, task=TaskConfig(kind="qa", train=str(root / "unused.jsonl")),
        eval=EvalConfig(max_examples=6, max_new_tokens=6, batch_size=4, bootstrap=50, agreement_groups=3,
                        agreement_group_size=4, seed=11),
    )
    original = _policy_folder(root / "original", config, seed=1)
    sft = _policy_folder(root / "sft", config, seed=2)
    torch.manual_seed(3)
    RewardModel.from_causal_lm(sft).save_pretrained(root / "reward")
    log = root / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "reward/mean": 0.1 * s, "objective/kl": 0.02 * s}) + "\n"
                           for s in range(5)))
    # "str" reuses the original weights: same model + same seeds must give the same answers.
    rows = [("original", original), ("sft", sft), ("str", original)]
    out = root / "eval"
    results = evaluate_rows(config, rows, _examples(), out, reward_folders={"str": root / "reward"},
                            ppo_logs={"str": log, "str_noise": root / "missing.jsonl"}, task_kind="qa")
    return config, results, out


def _generations(out, row):
    return [json.loads(line) for line in (out / f"generations_{row}.jsonl").read_text().splitlines()]


def test_rows_metrics_and_generations(run_folder):
    config, results, out = run_folder
    assert list(results["rows"]) == ["original", "sft", "str", "sft_greedy", "sft_majority", "sft_rerank_str",
                                     "str_greedy"]
    assert results["n_examples"] == 6  # capped by eval.max_examples
    for name, row in results["rows"].items():
        gens = _generations(out, name)
        assert [g["id"] for g in gens] == [f"q{i}" for i in range(6)]
        # per-example scores in the file are the metrics of the saved text; the row mean is their mean
        rescored = metrics.score_examples([g["generation"] for g in gens], [g["references"] for g in gens], qa=True)
        for m in ("bleu4", "gleu", "meteor", "em", "f1", "precision", "recall"):
            assert [g[m] for g in gens] == pytest.approx(rescored[m].tolist())
            ci = row["metrics"][m]
            assert ci["mean"] == pytest.approx(float(np.mean(rescored[m])))
            assert ci["low"] <= ci["mean"] <= ci["high"]
        assert row["corpus_bleu"] == pytest.approx(
            metrics.corpus_bleu([g["generation"] for g in gens], [g["references"] for g in gens]))
    # common random numbers: the same weights answer identically
    same = [g["generation"] for g in _generations(out, "original")]
    assert [g["generation"] for g in _generations(out, "str")] == same
    assert any(g["generation"] for g in _generations(out, "sft"))


def test_several_answers_per_prompt_score_their_mean(run_folder, tmp_path):
    config, first, _ = run_folder
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, samples_per_prompt=3,
                                                                  agreement_groups=0, controls=False))
    rows = [("sft", Path(first["rows"]["sft"]["model"]))]
    results = evaluate_rows(config, rows, _examples(), tmp_path / "eval", task_kind="qa")
    gens = _generations(tmp_path / "eval", "sft")
    assert all(len(g["generations"]) == 3 and "generation" not in g for g in gens)
    answers = [t for g in gens for t in g["generations"]]
    assert len(set(answers)) > 6  # three different draws per prompt, not one answer repeated
    per_answer = metrics.score_examples(answers, [g["references"] for g in gens for _ in range(3)], qa=True)
    for m in ("meteor", "em", "f1"):
        means = per_answer[m].reshape(-1, 3).mean(1)
        assert [g[m] for g in gens] == pytest.approx(means.tolist())
        assert results["rows"]["sft"]["metrics"][m]["mean"] == pytest.approx(float(means.mean()))
    assert results["decoding"]["samples_per_prompt"] == 3
    assert "mean of its 3 sampled answers" in (tmp_path / "eval" / "report.md").read_text()


def test_control_rows_are_the_sft_models_greedy_and_majority_answers(run_folder):
    config, results, out = run_folder
    from selfrank.train.models.causal_lm import load_model
    from selfrank.train.sampling.generation import generate

    model, tokenizer = load_model(Path(results["rows"]["sft"]["model"]), config.model)
    prompts = [ex.prompt for ex in _examples()[:6]]
    greedy = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=config.eval.max_new_tokens).texts
    assert [g["generation"] for g in _generations(out, "sft_greedy")] == greedy
    # the STR row (here the original weights) decoding greedily
    model, tokenizer = load_model(Path(results["rows"]["str"]["model"]), config.model)
    greedy = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=config.eval.max_new_tokens).texts
    assert [g["generation"] for g in _generations(out, "str_greedy")] == greedy
    k = config.sample.samples_per_prompt  # eval.majority_samples unset: STR's K
    majority = _generations(out, "sft_majority")
    assert all(len(g["candidates"]) == k for g in majority)
    assert [g["generation"] for g in majority] == [g["candidates"][majority_pick(g["candidates"])] for g in majority]
    assert len({tuple(g["candidates"]) for g in majority}) > 1  # sampled per prompt, not one group repeated
    assert results["rows"]["sft_majority"]["decoding"].startswith(f"majority of {k} sampled")
    # best of the same K answers by the reward model, with no PPO
    reranked = _generations(out, "sft_rerank_str")
    assert [g["candidates"] for g in reranked] == [g["candidates"] for g in majority]
    flat = [c for g in reranked for c in g["candidates"]]
    values = reward_scores(config, out.parent / "reward", [p for p in prompts for _ in range(k)], flat)
    assert [g["generation"] for g in reranked] == [g["candidates"][int(np.argmax(values[i * k:(i + 1) * k]))]
                                                   for i, g in enumerate(reranked)]
    report = (out / "report.md").read_text()
    assert "SFT greedy (control)" in report and "SFT majority vote (control)" in report
    assert "SFT best of K by the STR RM (control)" in report
    assert "| STR, greedy |" in report and "| system - SFT greedy |" in report


def test_majority_pick_counts_normalised_answers_then_lexical_consensus():
    assert majority_pick(["London", "Paris", "paris."]) == 1  # two votes for "paris"; the earliest of them
    assert majority_pick(["a dog ran", "the cat sat", "The Cat sat!", "cat ran"]) == 1
    # all distinct: the answer sharing the most words with the others
    assert majority_pick(["the cat sat", "a dog ran", "the cat ran"]) == 2
    assert majority_pick(["x", "y"]) == 0  # nothing to prefer: the earliest
    assert majority_answers(["a", "b", "b", "c", "c", "d"], 3) == ["b", "c"]
    with pytest.raises(ValueError):
        majority_answers(["a", "b", "c"], 2)


def test_paired_differences_against_sft(run_folder):
    _, results, _ = run_folder
    paired = results["paired_vs_sft"]
    assert set(paired) == {"original", "str", "sft_greedy", "sft_majority", "sft_rerank_str"}
    greedy_pairs = results["paired_vs_sft_greedy"]  # a trained row decoding greedily against SFT greedy
    assert set(greedy_pairs) == {"str_greedy"}
    for m, d in greedy_pairs["str_greedy"].items():
        expected = results["rows"]["str_greedy"]["metrics"][m]["mean"] - results["rows"]["sft_greedy"]["metrics"][m]["mean"]
        assert d["diff"] == pytest.approx(expected)
    for name in ("original", "str"):
        for m, d in paired[name].items():
            expected = results["rows"][name]["metrics"][m]["mean"] - results["rows"]["sft"]["metrics"][m]["mean"]
            assert d["diff"] == pytest.approx(expected)
            assert d["low"] <= d["diff"] + 1e-12 and d["diff"] <= d["high"] + 1e-12
    assert paired["original"] == paired["str"]


def test_agreement_study_on_sft_samples(run_folder):
    _, results, out = run_folder
    agreement = results["agreement"]
    assert agreement["source_row"] == "sft" and agreement["n_groups"] == 3
    assert set(agreement["scorers"]) == {"textrank", "reward:str"}
    for scorer in agreement["scorers"].values():
        assert scorer["all"]["n_groups"] == 3
        assert 0.0 <= scorer["all"]["exact_match"] <= 1.0
        assert 1 / 24 <= scorer["all"]["chance"] <= 1.0
    groups = [json.loads(line) for line in (out / "agreement_groups.jsonl").read_text().splitlines()]
    assert len(groups) == 3
    for g in groups:
        assert len(g["responses"]) == 4 and len(g["scores"]["reward:str"]) == 4 and len(g["scores"]["textrank"]) == 4
        refs = example_references(next(ex for ex in _examples() if ex.id == g["id"]), "qa", "unanswerable")
        assert g["ref_scores"] == pytest.approx([metrics.meteor(r, refs) for r in g["responses"]])
        assert sum(g["scores"]["textrank"]) == pytest.approx(1.0)


def test_report_written(run_folder):
    _, results, out = run_folder
    assert results["curves"]["str"]["reward/mean"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert "str_noise" not in results["curves"]  # missing log: skipped with a warning
    saved = json.loads((out / "report.json").read_text())
    assert saved["rows"]["sft"]["metrics"]["f1"] == results["rows"]["sft"]["metrics"]["f1"]
    md = (out / "report.md").read_text()
    assert "| SFT |" in md and "EM (x100)" in md and "textrank" in md
    for name in ("metrics.png", "reward.png", "kl.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_errors(tmp_path, run_folder):
    config, _, _ = run_folder
    with pytest.raises(UserError, match="no model folders"):
        evaluate_rows(config, [], _examples(), tmp_path, task_kind="qa")
    with pytest.raises(UserError, match="distinct"):
        evaluate_rows(config, [("a", tmp_path), ("a", tmp_path)], _examples(), tmp_path, task_kind="qa")
    with pytest.raises(UserError, match="model folder not found"):
        evaluate_rows(config, [("a", tmp_path / "nope")], _examples(), tmp_path, task_kind="qa")
    empty = Example(id="x", prompt="p", target="", references=[], meta={})
    with pytest.raises(UserError, match="test example x"):
        example_references(empty, "dialogue", "unanswerable")
    assert example_references(empty, "qa", "unanswerable") == ["unanswerable"]

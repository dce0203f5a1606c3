"""The embedded task: deterministic, leak-free, checkable, and agreement among samples tracks correctness."""
from __future__ import annotations

import collections
import dataclasses


from selfrank.train.config import PromptFormat, SyntheticTaskConfig
from selfrank.train.sampling.generation import generate
from selfrank.train.stages.sft import train_sft
from selfrank.train.data.synthetic import ATTRIBUTES, KINDS, is_correct, make_task, make_world

from tests.train.helpers import tiny_config, tiny_policy


def test_label_noise_only_in_training_targets():
    cfg = SyntheticTaskConfig(n_train=600, n_validation=60, n_test=60, seed=5, label_noise=0.3)
    data = make_task(cfg, PromptFormat())
    noisy = [ex for ex in data.train if ex.meta.get("noisy_target")]
    assert 0.22 < len(noisy) / len(data.train) < 0.38  # binomial(600, 0.3): +-4 standard deviations
    for ex in noisy:
        assert not is_correct(ex.target, ex)  # wrong, and of the same type as the true answer
        assert len(ex.target.split()) == len(ex.references[0].split())
    assert all(ex.target == ex.references[0] for ex in data.train if not ex.meta.get("noisy_target"))
    assert all(ex.target == ex.references[0] for ex in data.validation + data.test)
    clean = make_task(SyntheticTaskConfig(n_train=600, n_validation=60, n_test=60, seed=5, label_noise=0.0),
                      PromptFormat())
    assert [e.prompt for e in clean.train] == [e.prompt for e in data.train]  # noise never moves prompts


def test_deterministic_distinct_and_checkable():
    cfg = SyntheticTaskConfig(n_train=300, n_validation=60, n_test=60, seed=5)
    a, b = make_task(cfg, PromptFormat()), make_task(cfg, PromptFormat())
    assert [(e.prompt, e.target) for e in a.train] == [(e.prompt, e.target) for e in b.train]
    other = make_task(dataclasses.replace(cfg, seed=6), PromptFormat())
    assert [e.prompt for e in other.train] != [e.prompt for e in a.train]
    prompts = [e.prompt for split in (a.train, a.validation, a.test) for e in split]
    assert len(prompts) == len(set(prompts))  # no prompt is shared within or across splits
    assert collections.Counter(e.meta["kind"] for e in a.train) == {k: KINDS.count(k) * 100 for k in set(KINDS)}
    world = make_world(5, cfg.people)
    for ex in a.train:
        truth = ex.references[0]
        assert ex.prompt.startswith("<c> ") and " <q> " in ex.prompt and ex.prompt.endswith(" <a>")
        assert is_correct(f"  {truth.upper()} ", ex) and not is_correct(truth + " x", ex)
        if ex.meta["kind"] == "add":
            words = ex.prompt.split()
            person = words[words.index("does") + 1]
            have = [int(words[i + 2]) for i in range(len(words) - 2) if words[i] == person and words[i + 1] == "has"]
            more = [int(words[i + 2]) for i in range(len(words) - 2) if words[i] == person and words[i + 1] == "gets"]
            assert int(truth.split()[0]) == have[0] + more[0]
        else:
            # the answer is the world's value for the asked person and attribute, not stated in the prompt
            value = truth.split()[-1]
            person = next(w for w in ex.prompt.split(" <q> ")[1].split() if w in world)
            assert value == world[person][ex.meta["detail"]] and value in ATTRIBUTES[ex.meta["detail"]][4]


def test_majority_of_samples_beats_single_sample_after_brief_sft(tmp_path):
    """A briefly trained tiny model is right often but not always; the majority answer of K samples is right
    at least as often as one sample. Margin: with 48 prompts x 8 samples the single-sample accuracy is a mean
    over 384 draws, so 0.03 covers its sampling noise without hiding a real deficit of the majority."""
    cfg = tiny_config(tmp_path)
    cfg.task.synthetic = SyntheticTaskConfig(n_train=1200, n_validation=8, n_test=48)
    cfg.sft = dataclasses.replace(cfg.sft, lr=1e-2, batch_size=32, max_steps=250, warmup_ratio=0.05, save_every=10_000)
    data = make_task(cfg.task.synthetic, cfg.task.prompt)
    model, tok = tiny_policy(config=cfg)
    train_sft(cfg, data, model, tok, "full", tmp_path / "sft")
    k = 8
    gen = generate(model, tok, [e.prompt for e in data.test], n=k, temperature=0.8, top_p=0.95, max_new_tokens=8,
                   seed=0, batch_size=128)
    single = majority = 0.0
    for i, ex in enumerate(data.test):
        answers = gen.texts[i * k:(i + 1) * k]
        single += sum(is_correct(a, ex) for a in answers) / k
        majority += is_correct(collections.Counter(answers).most_common(1)[0][0], ex)
    single, majority = single / len(data.test), majority / len(data.test)
    print(f"single-sample accuracy {single:.3f}, majority-of-{k} accuracy {majority:.3f}")
    assert 0.1 <= single <= 0.95  # it learnt something (an untrained model scores 0) but is not perfect
    assert majority >= single - 0.03

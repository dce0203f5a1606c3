"""The offline embedded task: short, checkable answers generated in code from a seed.

A fixed little world (``people`` persons x 4 attributes: city, pet, job, colour) is drawn from the seed.
Two kinds of question:

* ``fact`` (two thirds), closed-book: ``<c> ben has a cat . ada lives in paris . <q> where does ben live ?
  <a> in oslo``: the context states other facts, the asked one must have been learnt in training;
* ``add``: ``<c> ann has 3 eggs . tom has 5 eggs . ann gets 4 more eggs . <q> how many eggs does ann have ?
  <a> 7 eggs`` (with a distracting second person).

A share of the *training* answers is replaced by a wrong answer of the same type (``label_noise``). A model
fitted to such data keeps the right answer as its most likely one while spreading the rest over many
different wrong ones, so one sample is often wrong but the centre of K samples is usually right: agreement
among samples tracks correctness, which is the premise of STR. Evaluation scores against the true answers.
"""
from __future__ import annotations

import random

from selfrank.train.config import PromptFormat, SyntheticTaskConfig
from selfrank.train.data.examples import Example, TaskData
from selfrank.train.data.prompts import markers_prompt, qa_parts

NAMES = ("ann", "tom", "sam", "eva", "bob", "lia", "max", "zoe", "ian", "kim", "leo", "amy", "joe", "mia",
         "ben", "ivy", "dan", "eli", "gus", "ada")
# A fixed little world: every person has one value of each attribute (drawn from the task seed).
ATTRIBUTES = {
    "city": ("question", "where does {p} live ?", "{p} lives in {v} .", "in {v}",
             ("paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito")),
    "pet": ("question", "what pet does {p} have ?", "{p} has a {v} .", "a {v}",
            ("cat", "dog", "fish", "bird", "frog", "horse", "rabbit", "snake")),
    "job": ("question", "what does {p} do ?", "{p} works as a {v} .", "a {v}",
            ("baker", "nurse", "pilot", "farmer", "doctor", "teacher", "singer", "driver")),
    "color": ("question", "what color does {p} like ?", "{p} likes {v} .", "{v}",
              ("red", "blue", "green", "black", "white", "pink", "brown", "gray")),
}
COUNTED = ("apples", "coins", "cards", "shells", "stamps", "eggs")
KINDS = ("fact", "fact", "add")


def make_world(seed: int, people: int = len(NAMES)) -> dict[str, dict[str, str]]:
    """person -> attribute -> value, fixed for the task (the knowledge the model must learn)."""
    rng = random.Random(f"world-{seed}")
    return {p: {a: rng.choice(spec[4]) for a, spec in ATTRIBUTES.items()} for p in NAMES[:people]}


def _fact(rng: random.Random, world: dict[str, dict[str, str]]) -> tuple[str, str, str, str]:
    """Ask one attribute of one person; the context states one or two of their *other* attributes.

    The answer is not in the prompt: it is world knowledge learnt in training, as in closed-book QA, so
    a partly trained model knows some facts and guesses among same-type values for the rest.
    """
    person = rng.choice(list(world))
    asked = rng.choice(list(ATTRIBUTES))
    others = rng.sample([a for a in ATTRIBUTES if a != asked], rng.randint(1, 2))
    facts = [ATTRIBUTES[a][2].format(p=person, v=world[person][a]) for a in others]
    # A true fact about someone else, so that the name in the question must be matched, not just any name.
    other = rng.choice([n for n in world if n != person])
    other_attr = rng.choice(list(ATTRIBUTES))
    facts.insert(rng.randint(0, len(facts)), ATTRIBUTES[other_attr][2].format(p=other, v=world[other][other_attr]))
    context = " ".join(facts)
    _, question, _, answer, _ = ATTRIBUTES[asked]
    return context, question.format(p=person), answer.format(v=world[person][asked]), asked


def _addition(rng: random.Random) -> tuple[str, str, str]:
    person, thing = rng.choice(NAMES), rng.choice(COUNTED)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    # A distracting second person keeps the model reading the context rather than the question alone.
    other = rng.choice([n for n in NAMES if n != person])
    facts = [f"{person} has {a} {thing} .", f"{other} has {rng.randint(1, 9)} {thing} ."]
    rng.shuffle(facts)
    context = " ".join(facts) + f" {person} gets {b} more {thing} ."
    return context, f"how many {thing} does {person} have ?", f"{a + b} {thing}"


def make_example(rng: random.Random, index: int, split: str, fmt: PromptFormat,
                 world: dict[str, dict[str, str]], kind: str) -> Example:
    if kind == "add":
        context, question, answer = _addition(rng)
        detail = "add"
    else:
        context, question, answer, detail = _fact(rng, world)
    parts = qa_parts(context, question)
    return Example(id=f"{split}-{index}", prompt=markers_prompt(parts, fmt), target=answer, references=[answer],
                   meta={"kind": kind, "detail": detail, "group": f"{split}-{index}"}, parts=parts)


def wrong_answer(rng: random.Random, example: Example, world: dict[str, dict[str, str]]) -> str:
    """A plausible wrong answer of the same type: another value of the asked attribute, or a near sum."""
    if example.meta["kind"] == "add":
        number, thing = example.target.split(" ", 1)
        wrong = int(number) + rng.choice([-3, -2, -1, 1, 2, 3])
        return f"{max(wrong, 0)} {thing}"  # sums are >= 2, so the clamp never hits the true answer
    spec = ATTRIBUTES[example.meta["detail"]]
    values = [v for v in spec[4] if spec[3].format(v=v) != example.target]
    return spec[3].format(v=rng.choice(values))


def add_label_noise(examples: list[Example], share: float, seed: int, world: dict[str, dict[str, str]]) -> int:
    """Replace the training target of a ``share`` of examples by a wrong answer of the same type.

    Why: this is the situation self-consistency repairs. A model fitted to noisy answers keeps the
    right one as its most likely answer while spreading the rest of its mass over many different wrong
    ones, so a single sample is often wrong but the centre of K samples is usually right. References
    (what evaluation scores against) stay the true answers. Returns how many targets were replaced."""
    rng = random.Random(f"noise-{seed}")
    changed = 0
    for ex in examples:
        if rng.random() < share:
            ex.target = wrong_answer(rng, ex, world)
            ex.meta["noisy_target"] = True
            changed += 1
    return changed


def make_task(cfg: SyntheticTaskConfig, fmt: PromptFormat) -> TaskData:
    """Seeded train/validation/test examples; a prompt that occurs in train is never reused later.
    Only the training targets carry label noise (``cfg.label_noise``)."""
    rng = random.Random(cfg.seed)
    world = make_world(cfg.seed, cfg.people)
    seen: set[str] = set()
    splits = {}
    for split, count in (("train", cfg.n_train), ("validation", cfg.n_validation), ("test", cfg.n_test)):
        examples = []
        index = 0
        attempts = 0
        while len(examples) < count:
            ex = make_example(rng, index, split, fmt, world, KINDS[len(examples) % len(KINDS)])
            index += 1
            attempts += 1
            if ex.prompt in seen:
                if attempts > 20 * count + 1000:
                    raise RuntimeError("synthetic task: too few distinct prompts for the requested sizes")
                continue
            seen.add(ex.prompt)
            examples.append(ex)
        splits[split] = examples
    if cfg.label_noise > 0:
        add_label_noise(splits["train"], cfg.label_noise, cfg.seed, world)
    return TaskData(splits["train"], splits["validation"], splits["test"])


def is_correct(answer: str, example: Example) -> bool:
    """Exact match after collapsing whitespace and case (answers are short phrases)."""
    norm = " ".join(answer.lower().split())
    return any(norm == " ".join(r.lower().split()) for r in example.references)

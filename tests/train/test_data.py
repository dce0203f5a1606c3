"""Task loading from the real shared data: prompts, references, leakage-free splits, strict row checks."""
from __future__ import annotations

import json

import pytest

from selfrank.errors import UserError
from selfrank.train.config import PromptFormat, TaskConfig
from selfrank.train.data.tasks import cap, load_task


def _groups(examples):
    return {ex.meta["group"] for ex in examples}


def test_squad_single_file_split_by_article(shared_data):
    cfg = TaskConfig(kind="qa", train=str(shared_data / "squad_v2" / "dev.jsonl"))
    data = load_task(cfg)
    total = len(data.train) + len(data.validation) + len(data.test)
    assert total == 11873
    assert min(len(data.train), len(data.validation), len(data.test)) > 0
    # no article (hence no context) is shared between splits
    assert not _groups(data.train) & _groups(data.validation)
    assert not _groups(data.train) & _groups(data.test)
    assert not _groups(data.validation) & _groups(data.test)
    contexts = [{ex.prompt.split(" <q> ")[0] for ex in split} for split in (data.train, data.validation, data.test)]
    assert not contexts[0] & contexts[1] and not contexts[0] & contexts[2]
    impossible = [ex for ex in data.train if ex.meta["impossible"]]
    answerable = [ex for ex in data.train if not ex.meta["impossible"]]
    assert impossible and answerable
    assert all(ex.target == "unanswerable" and ex.references == ["unanswerable"] for ex in impossible)
    ex = answerable[0]
    assert ex.prompt.startswith("<c> ") and " <q> " in ex.prompt and ex.prompt.endswith(" <a>")
    assert ex.target == ex.references[0] and len(ex.references) == len(set(ex.references))
    # deterministic
    again = load_task(cfg)
    assert [e.id for e in again.test] == [e.id for e in data.test]


def test_dialogue_files_and_context_window(shared_data):
    folder = shared_data / "dailydialog"
    cfg = TaskConfig(kind="dialogue", train=str(folder / "validation.jsonl"), validation=str(folder / "test.jsonl"),
                     max_validation=50, prompt=PromptFormat(max_context_turns=2))
    data = load_task(cfg)
    assert len(data.validation) == 50
    # the test split is carved from train by dialogue: no dialogue in two splits
    assert data.test and not _groups(data.train) & _groups(data.test)
    first = json.loads((folder / "validation.jsonl").read_text().splitlines()[3])
    ex = next(e for e in data.train + data.test if e.id == "validation:4")
    kept = first["context"][-2:]
    assert ex.prompt == "<c> " + " ".join(kept) + " <a>"
    assert ex.target == first["response"] and ex.references == [first["response"]]


def test_cornell_dialogue_three_files(shared_data):
    folder = shared_data / "cornell_movie_dialogs"
    data = load_task(TaskConfig(kind="dialogue", train=str(folder / "train.jsonl"),
                                validation=str(folder / "validation.jsonl"), test=str(folder / "test.jsonl")))
    assert (len(data.train), len(data.validation), len(data.test)) == (2846, 344, 386)


def test_caps_are_deterministic_subsets():
    cfg = TaskConfig(kind="synthetic", max_train=10, max_test=5)
    a, b = load_task(cfg), load_task(cfg)
    assert len(a.train) == 10 and len(a.test) == 5
    assert [e.id for e in a.train] == [e.id for e in b.train]
    full = load_task(TaskConfig(kind="synthetic"))
    ids = [e.id for e in full.train]
    assert set(e.id for e in a.train) <= set(ids)
    assert cap(full.train, None) is full.train


@pytest.mark.parametrize("row, message", [
    ({"context": ["hi"], "response": ""}, "'response' is empty"),
    ({"context": [], "response": "x"}, "'context' is an empty list"),
    ({"context": "hi", "response": "x"}, "'context' must be a list"),
    ({"context": ["hi"]}, "missing field 'response'"),
    ({"context": ["hi", 3], "response": "x"}, "'context' must be a list of strings"),
])
def test_bad_dialogue_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    good = {"context": ["a", "b"], "response": "c"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"d\.jsonl:2: .*{message}"):
        load_task(TaskConfig(kind="dialogue", train=str(path)))


@pytest.mark.parametrize("change, message", [
    ({"question": 5}, "'question' must be a string"),
    ({"answers": [], "is_impossible": False}, "answerable question with no answers"),
    ({"is_impossible": "no"}, "'is_impossible' must be true or false"),
    ({"context": "  "}, "'context' is empty"),
])
def test_bad_squad_rows_name_file_and_line(tmp_path, change, message):
    base = {"id": "q1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
            "answers": ["France"], "is_impossible": False}
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join([json.dumps(base), json.dumps({**base, "id": "q2"}),
                               json.dumps({**base, "id": "q3", **change})]) + "\n")
    with pytest.raises(UserError, match=rf"s\.jsonl:3: .*{message}"):
        load_task(TaskConfig(kind="qa", train=str(path)))


def test_too_few_groups_to_carve(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"context": ["a"], "response": "b"}) + "\n"
                    + json.dumps({"context": ["a", "b"], "response": "c"}) + "\n")
    with pytest.raises(UserError, match="cannot carve"):
        load_task(TaskConfig(kind="dialogue", train=str(path)))


def test_official_squad_json(tmp_path):
    path = tmp_path / "squad.json"
    articles = [{"title": f"A{i}", "paragraphs": [{"context": f"Text {i} here.", "qas": [
        {"id": f"q{i}", "question": f"What {i}?", "answers": [{"text": f"{i}", "answer_start": 5}],
         "is_impossible": False},
        {"id": f"u{i}", "question": "Why?", "answers": [], "is_impossible": True}]}]} for i in range(12)]
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    data = load_task(TaskConfig(kind="qa", train=str(path)))
    assert len(data.train) + len(data.validation) + len(data.test) == 24
    assert {ex.target for ex in data.train} - {"unanswerable"} <= {str(i) for i in range(12)}

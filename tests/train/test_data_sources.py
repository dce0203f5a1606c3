"""Task data the `datasets` way: one dataset as JSONL, Parquet and CSV; renamed columns; chat messages;
a prompts-only PPO source; bad rows named by file and line (or row) through the CLI, exit 2."""
from __future__ import annotations

import csv
import dataclasses
import json

import datasets
import pytest
import yaml

from selfrank.errors import UserError
from selfrank.launch.cli import main as cli_main
from selfrank.launch.config import build
from selfrank.train.config import ExperimentConfig, PPOConfig, PromptFormat, TaskColumns, TaskConfig
from selfrank.train.data.ppo_prompts import ppo_prompts, read_prompt_file
from selfrank.train.data.tasks import load_prompted_task, load_task
from tests.train.helpers import tiny_chat_config, tiny_chat_policy, tiny_config, tiny_policy

LIST_COLUMNS = ("context", "answers", "messages", "turns", "history", "gold")


def _dialogue_rows(n=12):
    return [{"context": [f"hello {i}", f"how are you {i}"], "response": f"fine {i}"} for i in range(n)]


def _qa_rows(n=12):
    rows = []
    for i in range(n):
        impossible = i % 3 == 0
        rows.append({"id": f"q{i}", "title": f"Article {i}", "context": f"Paris {i} is in France.",
                     "question": f"Where is Paris {i}?", "answers": [] if impossible else ["France", "in France"],
                     "is_impossible": impossible})
    return rows


def _write(rows, path):
    """``rows`` as ``path``'s format: JSON lines, Parquet (written by `datasets`), or CSV (lists as JSON text)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else
                                 str(v).lower() if isinstance(v, bool) else v for k, v in row.items()})
    return path


def _view(data):
    """What an example is, apart from where it was read."""
    return [[(ex.id, ex.prompt, ex.target, ex.references, ex.parts, ex.meta["group"], ex.meta.get("impossible"))
             for ex in split] for split in (data.train, data.validation, data.test)]


@pytest.mark.parametrize("kind, rows", [("dialogue", _dialogue_rows()), ("qa", _qa_rows())])
def test_jsonl_parquet_and_csv_load_to_equal_examples(tmp_path, kind, rows):
    views = {}
    for suffix in (".jsonl", ".parquet", ".csv"):
        folder = tmp_path / suffix[1:]
        folder.mkdir()
        path = _write(rows, folder / f"data{suffix}")
        data = load_task(TaskConfig(kind=kind, train=str(path)))
        views[suffix] = _view(data)
        assert data.train[0].meta["source"] == (f"{path}:1" if suffix == ".jsonl" else f"{path}:row 1")
    assert views[".jsonl"] == views[".parquet"] == views[".csv"]
    total = sum(len(split) for split in views[".jsonl"])
    assert total == len(rows)
    if kind == "qa":
        impossible = [v for split in views[".csv"] for v in split if v[6]]
        assert impossible and all(v[3] == ["unanswerable"] for v in impossible)


def test_squad_style_answers_in_parquet(tmp_path):
    rows = [{"id": f"q{i}", "title": f"T{i}", "context": f"C {i} here.", "question": f"Q {i}?",
             "answers": {"text": [f"A{i}", f"A{i}"], "answer_start": [0, 0]}} for i in range(12)]
    path = _write(rows, tmp_path / "squad.parquet")
    data = load_task(TaskConfig(kind="qa", train=str(path)))
    every = data.train + data.validation + data.test
    assert sorted(ex.target for ex in every) == sorted(f"A{i}" for i in range(12))
    assert all(ex.references == [ex.target] for ex in every)  # duplicates dropped, none unanswerable


def test_renamed_columns_qa_and_dialogue(tmp_path):
    qa = [{"qid": r["id"], "passage": r["context"], "q": r["question"], "gold": r["answers"],
           "title": r["title"]} for r in _qa_rows()]
    renamed = load_task(TaskConfig(kind="qa", train=str(_write(qa, tmp_path / "qa.parquet")),
                                   columns=TaskColumns(id="qid", context="passage", question="q", answers="gold")))
    plain = load_task(TaskConfig(kind="qa", train=str(_write(_qa_rows(), tmp_path / "qa.jsonl"))))
    assert _view(renamed) == _view(plain)

    talk = [{"history": r["context"], "reply": r["response"]} for r in _dialogue_rows()]
    path = _write(talk, tmp_path / "talk.csv")
    data = load_task(TaskConfig(kind="dialogue", train=str(path), columns=TaskColumns(turns="history", response="reply")))
    every = data.train + data.validation + data.test
    assert sorted(ex.target for ex in every) == sorted(r["reply"] for r in talk)
    ex = next(e for e in every if e.target == "fine 3")
    assert ex.prompt == "<c> hello 3 how are you 3 <a>"
    # a mapped column missing from a row is named with the row
    with pytest.raises(UserError, match=r"talk\.csv:row 1: missing field 'answer'"):
        load_task(TaskConfig(kind="dialogue", train=str(path), columns=TaskColumns(turns="history", response="answer")))


def test_columns_in_yaml_are_typed_and_checked():
    cfg = build(ExperimentConfig, {"task": {"kind": "qa", "train": "x.jsonl", "columns": {"question": "q"}}})
    assert cfg.task.columns.name("question") == "q" and cfg.task.columns.name("context") == "context"
    with pytest.raises(UserError, match="unknown setting 'task.columns.questoin'.*did you mean 'question'"):
        build(ExperimentConfig, {"task": {"kind": "qa", "train": "x.jsonl", "columns": {"questoin": "q"}}})
    with pytest.raises(UserError, match="task.columns.turns: not a column of task.kind 'qa'"):
        TaskConfig(kind="qa", train="x.jsonl", columns=TaskColumns(turns="history"))
    with pytest.raises(UserError, match="give one of turns, messages or prompt"):
        TaskConfig(kind="dialogue", train="x.jsonl", columns=TaskColumns(turns="a", messages="b"))
    with pytest.raises(UserError, match="task.columns.question: must be a non-empty column name"):
        TaskConfig(kind="qa", train="x.jsonl", columns=TaskColumns(question=" "))


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}]


def _message_rows(n=12):
    rows = []
    for i in range(n):
        messages = [dict(m) for m in CONVERSATION]
        messages[1]["content"] = f"Hi there {i}."
        rows.append({"messages": messages})
    return rows


def test_messages_rows_give_context_response_and_a_chat_prompt(tmp_path):
    path = _write(_message_rows(), tmp_path / "chat.jsonl")
    cfg = tiny_chat_config(tmp_path)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, kind="dialogue", train=str(path),
                                                           prompt=PromptFormat(style="chat", max_context_turns=0)))
    data = load_task(cfg.task)
    ex = next(e for e in data.train + data.validation + data.test if e.id == "chat:1")
    assert ex.target == "Blue." and ex.references == ["Blue."]
    assert ex.parts.context == ("Hi there 0.", "Hello.", "Name a colour.")
    assert ex.parts.roles == ("user", "assistant", "user") and ex.parts.system == "Be brief."
    assert ex.prompt == "<c> Hi there 0. Hello. Name a colour. <a>"  # markers: the turns alone

    _, tokenizer = tiny_chat_policy(tmp_path, cfg)
    prompted = load_prompted_task(cfg, tokenizer)
    chat = next(e for e in prompted.train + prompted.validation + prompted.test if e.id == "chat:1")
    expected = tokenizer.apply_chat_template(CONVERSATION[:1] + [{"role": "user", "content": "Hi there 0."}]
                                             + CONVERSATION[2:4], tokenize=False, add_generation_prompt=True)
    assert chat.prompt == expected and "Blue." not in chat.prompt

    # the same rows in Parquet (a list of structs) read the same
    parquet = load_task(dataclasses.replace(cfg.task, train=str(_write(_message_rows(), tmp_path / "chat.parquet"))))
    assert _view(parquet) == _view(data)


@pytest.mark.parametrize("messages, message", [
    (CONVERSATION[:4], "must end with the assistant's message"),
    ([{"role": "assistant", "content": "x"}], "no message before the response"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
     r"messages\[1\]: a system message may only come first"),
    ([{"role": "bot", "content": "a"}], r"messages\[0\]: role must be one of"),
    ([{"role": "user"}], r"messages\[0\] must be an object with 'role' and 'content'"),
])
def test_bad_messages_rows_name_the_line(tmp_path, messages, message):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(UserError, match=rf"m\.jsonl:2: .*{message}"):
        load_task(TaskConfig(kind="dialogue", train=str(path)))


def test_prompt_response_pairs(tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(12)]
    data = load_task(TaskConfig(kind="dialogue", train=str(_write(rows, tmp_path / "p.parquet")),
                                columns=TaskColumns(prompt="instruction", response="output")))
    every = data.train + data.validation + data.test
    assert sorted(ex.target for ex in every) == sorted(r["output"] for r in rows)
    for ex in every:
        assert ex.prompt == f"<c> Say {ex.target}. <a>" and ex.parts.context == (f"Say {ex.target}.",)


# ----------------------------------------------------------------------------------------------- PPO prompts

def _prompt_rows():
    return [{"prompt": "Tell me a fact."},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
            {"context": ["hi", "hello", "what now?"]}]


def test_ppo_draws_from_the_prompts_file_markers(tmp_path):
    prompts_file = _write(_prompt_rows(), tmp_path / "prompts.jsonl")
    base = tiny_config(tmp_path)
    tiny_policy(tmp_path, base)
    # without ppo.prompts: the task's training split
    assert ppo_prompts(base, tmp_path / "policy") == [ex.prompt for ex in load_task(base.task).train]
    cfg = dataclasses.replace(base, task=dataclasses.replace(base.task, kind="dialogue", train="unused.jsonl"),
                              ppo=dataclasses.replace(base.ppo, prompts=str(prompts_file)))
    assert ppo_prompts(cfg, tmp_path / "policy") == [
        "<c> Tell me a fact. <a>", "<c> Name a colour. <a>", "<c> hi hello what now? <a>"]


def test_ppo_draws_from_the_prompts_file_chat(tmp_path):
    prompts_file = _write(_prompt_rows()[:2], tmp_path / "prompts.csv")
    cfg = tiny_chat_config(tmp_path)
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, prompts=str(prompts_file)))
    _, tokenizer = tiny_chat_policy(tmp_path, cfg)
    got = ppo_prompts(cfg, tmp_path / "policy")
    assert got == [
        tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a fact."}], tokenize=False,
                                      add_generation_prompt=True),
        tokenizer.apply_chat_template(_prompt_rows()[1]["messages"], tokenize=False, add_generation_prompt=True)]


def test_qa_prompts_file_reads_context_and_question(tmp_path):
    path = _write([{"passage": "Paris is in France.", "q": "Where is Paris?"}], tmp_path / "p.jsonl")
    task = TaskConfig(kind="qa", train="x.jsonl", columns=TaskColumns(context="passage", question="q"))
    [(where, parts)] = read_prompt_file(str(path), task)
    assert where == f"{path}:1" and parts.context == ("Paris is in France.",) and parts.question == "Where is Paris?"


@pytest.mark.parametrize("row, message", [
    ({"messages": CONVERSATION}, "must end with a user message"),
    ({"text": "x"}, "a prompt row needs a 'prompt' \\(text\\) or 'messages' \\(chat\\) field"),
    ({"prompt": ""}, "field 'prompt' is empty"),
])
def test_bad_prompt_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"p\.jsonl:2: .*{message}"):
        read_prompt_file(str(path), TaskConfig(kind="dialogue", train="x.jsonl"))


# ----------------------------------------------------------------------------------------------- the CLI

def _config_file(tmp_path, task: dict, **sections) -> str:
    settings = {"name": "data", "output_dir": str(tmp_path / "runs"), "task": task, **sections}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def _cli_error(capsys, *argv) -> str:
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("suffix, where", [(".jsonl", ":3: "), (".parquet", ":row 3: "), (".csv", ":row 3: ")])
def test_cli_bad_row_is_one_line_naming_it_exit_2(tmp_path, capsys, suffix, where):
    rows = _qa_rows(4)
    rows[2]["question"] = ""
    path = _write(rows, tmp_path / f"bad{suffix}")
    err = _cli_error(capsys, "run", _config_file(tmp_path, {"kind": "qa", "train": str(path)}), "--dry-run")
    assert err == f"selfrank: error: {path}{where}field 'question' is empty"


def test_cli_bad_prompts_file_row_exit_2(tmp_path, capsys):
    data = _write(_dialogue_rows(), tmp_path / "d.jsonl")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + json.dumps({"messages": CONVERSATION}) + "\n")
    err = _cli_error(capsys, "run", _config_file(tmp_path, {"kind": "dialogue", "train": str(data)},
                                                 ppo={"prompts": str(prompts)}), "--dry-run")
    assert err.startswith(f"selfrank: error: {prompts}:3: field 'messages' must end with a user message")


def test_cli_offline_hub_name_is_one_line_exit_2(tmp_path, capsys):
    # No network here (HF_DATASETS_OFFLINE=1): a hub name that is not cached fails in one line.
    err = _cli_error(capsys, "run", _config_file(tmp_path, {"kind": "qa", "train": "nobody-here/no-such-dataset"}),
                     "--dry-run")
    assert "cannot load hub dataset 'nobody-here/no-such-dataset'" in err


def test_script_dataset_folder_suggests_the_parquet_conversion(tmp_path):
    # A dataset repository laid out with a loading script (as script-based hub datasets are): never run.
    repo = tmp_path / "scripted"
    repo.mkdir()
    (repo / "scripted.py").write_text("raise SystemExit('a dataset script must never run')\n")
    with pytest.raises(UserError, match="script-based hub dataset.*task.hub_revision: refs/convert/parquet"):
        load_task(TaskConfig(kind="qa", train=str(repo)))


def test_local_files_load_offline_and_hub_revision_is_a_setting(tmp_path):
    cfg = build(ExperimentConfig, {"task": {"kind": "qa", "train": "org/name", "hub_revision": "refs/convert/parquet"},
                                   "ppo": {"prompts": "p.jsonl"}})
    assert cfg.task.hub_revision == "refs/convert/parquet" and cfg.ppo.prompts == "p.jsonl"
    assert datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
    with pytest.raises(UserError, match="ppo.prompts: must be a file path"):
        PPOConfig(prompts=" ")


def test_readme_data_example_is_a_valid_config(tmp_path, repo_root):
    body = (repo_root / "README.md").read_text(encoding="utf-8").split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    settings = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    cfg = build(ExperimentConfig, settings)
    assert cfg.task.columns.name("context") == "passage" and cfg.ppo.prompts
    # its prompts-only rows, as the comment says, read with its column mapping
    path = _write([{"passage": "Paris is in France.", "query": "Where is Paris?"}, {"prompt": "Name a city."}],
                  tmp_path / "unlabelled_questions.jsonl")
    parts = [p for _, p in read_prompt_file(str(path), cfg.task)]
    assert parts[0].question == "Where is Paris?" and parts[1].context == ("Name a city.",)

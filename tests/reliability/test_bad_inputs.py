"""Bad data files and models: exit 2, one line naming the field or file:line, nothing written.

Config mistakes are covered in tests/launch/test_bad_config.py and bad ``selfrank rank`` input in
tests/ranking/test_rank_cli.py; these are the task-data and model cases.
"""
from __future__ import annotations

import json
import signal

import pytest

from selfrank.launch.cli import main
from selfrank.train.config import ModelConfig
from selfrank.train.models.causal_lm import load_causal_lm, save_model

from tests.reliability.helpers import error_lines, run, write_config

GOOD_DIALOGUE = {"context": ["hello there", "hi"], "response": "how are you"}
GOOD_QA = {"id": "q1", "title": "T", "context": "The cat sat.", "question": "Who sat?", "answers": ["the cat"]}


def _jsonl(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# (case id, task kind, file name, file bytes or None for a directory, text the one error line must hold)
DATA_CASES = [
    ("empty-file", "dialogue", "d.jsonl", b"", "no rows (the file is empty)"),
    ("blank-lines-only", "dialogue", "d.jsonl", b"\n  \n\n", "no rows"),
    ("malformed-json", "dialogue", "d.jsonl", _jsonl([GOOD_DIALOGUE, b'{"context": ["a"], "response": ']), "d.jsonl:2: invalid JSON"),
    ("not-an-object", "dialogue", "d.jsonl", _jsonl([[1, 2]]), "d.jsonl:1: expected a JSON object, got list"),
    ("missing-response", "dialogue", "d.jsonl", _jsonl([{"context": ["a"]}]), "d.jsonl:1: missing field 'response'"),
    ("missing-context", "dialogue", "d.jsonl", _jsonl([GOOD_DIALOGUE, {"response": "x"}]), "d.jsonl:2: missing field 'context'"),
    ("empty-response", "dialogue", "d.jsonl", _jsonl([{"context": ["a"], "response": "   "}]), "d.jsonl:1: field 'response' is empty"),
    ("empty-turn", "dialogue", "d.jsonl", _jsonl([{"context": ["a", ""], "response": "b"}]), "d.jsonl:1: field 'context' has an empty string"),
    ("empty-context", "dialogue", "d.jsonl", _jsonl([{"context": [], "response": "b"}]), "d.jsonl:1: field 'context' is an empty list"),
    ("context-not-list", "dialogue", "d.jsonl", _jsonl([{"context": "a", "response": "b"}]), "d.jsonl:1: field 'context' must be a list of strings"),
    ("response-wrong-type", "dialogue", "d.jsonl", _jsonl([{"context": ["a"], "response": 5}]), "d.jsonl:1: field 'response' must be a string, got int"),
    ("non-utf8", "dialogue", "d.jsonl", _jsonl([GOOD_DIALOGUE, b'{"context": ["caf\xe9"], "response": "x"}']), "d.jsonl:2: not valid UTF-8"),
    ("line-too-long", "dialogue", "d.jsonl", _jsonl([{"context": ["a" * (16 * 1024 * 1024)], "response": "b"}]), "d.jsonl:1: line longer than"),
    ("directory", "dialogue", "d.jsonl", None, "d.jsonl: file not found"),
    ("wrong-suffix", "dialogue", "d.txt", _jsonl([GOOD_DIALOGUE]), "d.txt: expected a .jsonl, .json, .parquet or .csv file"),
    ("qa-duplicate-id", "qa", "q.jsonl", _jsonl([GOOD_QA, {**GOOD_QA, "question": "Where?"}]), "q.jsonl:2: duplicate id 'q1' (first at"),
    ("qa-missing-question", "qa", "q.jsonl", _jsonl([{k: v for k, v in GOOD_QA.items() if k != "question"}]), "q.jsonl:1: missing field 'question'"),
    ("qa-answers-not-list", "qa", "q.jsonl", _jsonl([{**GOOD_QA, "answers": "the cat"}]), "q.jsonl:1: field 'answers' must be a list of strings"),
    ("qa-impossible-not-bool", "qa", "q.jsonl", _jsonl([{**GOOD_QA, "is_impossible": "no"}]), "q.jsonl:1: field 'is_impossible' must be true or false"),
    ("qa-answerable-no-answer", "qa", "q.jsonl", _jsonl([{**GOOD_QA, "answers": [], "is_impossible": False}]), "q.jsonl:1: answerable question with no answers"),
    ("qa-title-wrong-type", "qa", "q.jsonl", _jsonl([{**GOOD_QA, "title": 3}]), "q.jsonl:1: field 'title' must be a string"),
    ("qa-json-empty-list", "qa", "q.json", b"[]", "q.json: expected a non-empty JSON list"),
    ("qa-json-broken", "qa", "q.json", b'[{"id": ', "q.json: not valid JSON"),
    ("qa-squad-no-paragraphs", "qa", "q.json", json.dumps({"data": [{"title": "T"}]}).encode(), "q.json:data[0]: not in SQuAD format"),
]


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _cli(args, capsys) -> tuple[int, list[str]]:
    code = main(args)
    return code, error_lines(capsys.readouterr().err)


@pytest.mark.parametrize("case, kind, name, content, needle", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, kind, name, content, needle):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    config = write_config(tmp_path, "bad", **{"task.kind": kind, "task.train": str(path)})
    code, lines = _cli(["run", str(config)], capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("selfrank: error: ") and needle in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing written: no run folder, no config copy


def test_unknown_model_offline_suggests_a_local_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path, "bad", **{"model.name": "no-such-org/no-such-model"})
    code, lines = _cli(["sft", str(config)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "model.name" in lines[0] and "no-such-org/no-such-model" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "local folder" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("files, needle", [
    ({"config.json": "{}", "pytorch_model.bin": ""}, "only pickled weights (pytorch_model.bin)"),
    ({"pytorch_model.bin": ""}, "has no config.json"),
    ({"config.json": "{}"}, "no *.safetensors weights"),
], ids=["pickle-only", "no-config", "no-weights"])
def test_local_model_folder_without_safetensors_is_refused(tmp_path, capsys, files, needle):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    config = write_config(tmp_path, "bad", **{"model.name": str(folder)})
    code, lines = _cli(["run", str(config)], capsys)
    assert code == 2 and len(lines) == 1 and "model.name" in lines[0] and needle in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_tokenizer_without_pad_gets_its_own_pad_token(tmp_path):
    import torch

    from tests.train.helpers import tiny_policy

    model, tokenizer = tiny_policy()
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    assert tokenizer.pad_token_id is None
    save_model(model, tokenizer, tmp_path / "nopad")
    loaded, tok = load_causal_lm(str(tmp_path / "nopad"), ModelConfig(name=str(tmp_path / "nopad")))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert loaded.get_input_embeddings().num_embeddings >= len(tok)
    batch = tok(["a b c", "a"], return_tensors="pt", padding=True)
    assert (batch["input_ids"] == tok.pad_token_id).any()
    with torch.no_grad():
        assert torch.isfinite(loaded(**batch).logits).all()


@pytest.mark.slow
def test_real_cli_process_bad_data_no_traceback(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl([GOOD_DIALOGUE, {"context": ["a"], "response": 7}]))
    config = write_config(tmp_path, "bad", **{"task.kind": "dialogue", "task.train": str(path)})
    result = run(["run", str(config)], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [f"selfrank: error: {path}:2: field 'response' must be a string, got int"]
    assert not (tmp_path / "runs").exists()


def test_chat_prompts_without_room_are_refused_before_writing(tmp_path, capsys):
    config = write_config(tmp_path, "bad", **{"task.prompt.style": "chat", "sft.block_size": 24})
    code, lines = _cli(["run", str(config)], capsys)
    assert code == 2 and len(lines) == 1 and "task.prompt" in lines[0] and "sft.block_size" in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_bitfit_without_bias_terms_or_switches_is_refused_before_writing(tmp_path, capsys):
    from transformers import MistralConfig, MistralForCausalLM

    from tests.train.helpers import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    config = write_config(tmp_path, "bad", **{"model.name": str(tmp_path / "mistral"), "sft.method": "bitfit"})
    code, lines = _cli(["run", str(config)], capsys)
    assert code == 2 and len(lines) == 1 and "bitfit" in lines[0] and "mistral" in lines[0].lower(), lines
    assert not (tmp_path / "runs").exists()

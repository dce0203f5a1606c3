"""`selfrank rank` end to end: in process through selfrank.launch.cli.main and as a real subprocess."""
from __future__ import annotations

import json
import subprocess

import pytest

from selfrank.launch.cli import main
from selfrank.ranking.engine import JSON_KEYS

ROWS = [
    {"id": "first", "prompt": "Where is the station?", "responses": [
        "Two blocks north of here.", "The station is two blocks north.", "I love strawberry ice cream.",
        "Go two blocks north."]},
    {"prompt": "Any plans?", "responses": ["Cinema tonight.", "Going to the cinema tonight.", "Cinema."]},
    {"id": 12, "prompt": "One answer", "responses": ["Just this."]},
]


def write_lines(path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.fixture()
def good_input(tmp_path):
    path = tmp_path / "groups.jsonl"
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), json.dumps(ROWS[2])]
    write_lines(path, lines)
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_round_trip_in_process_one_and_two_workers(good_input, tmp_path):
    out1, out2 = tmp_path / "one.jsonl", tmp_path / "sub" / "two.jsonl"
    assert main(["rank", "--input", str(good_input), "--output", str(out1), "--embedder", "lexical"]) == 0
    assert main(["rank", "--input", str(good_input), "--output", str(out2), "--embedder", "lexical",
                 "--workers", "2"]) == 0
    rows = read_rows(out1)
    assert [r["id"] for r in rows] == ["first", "3", "12"]  # missing id -> its line number
    for row, given in zip(rows, ROWS):
        assert tuple(row) == JSON_KEYS
        assert row["responses"] == given["responses"]
        assert sorted(row["order"]) == list(range(len(given["responses"])))
        assert sum(row["scores"]) == pytest.approx(1.0)
    assert rows[0]["order"][-1] == 2  # the off-topic answer comes last
    assert rows[2]["pairs"] == []
    assert out2.read_bytes() == out1.read_bytes()


def test_noise_flag_and_yaml_config(good_input, tmp_path):
    config = tmp_path / "rank.yaml"
    config.write_text("ranking:\n  embedder: {name: lexical}\n  noise: {probability: 1.0}\n  isodata: {enabled: false}\n")
    out = tmp_path / "out.jsonl"
    assert main(["rank", "--input", str(good_input), "--output", str(out), "--config", str(config), "--noise"]) == 0
    rows = read_rows(out)
    assert rows[0]["pairs"] and all(rec is not None and rec["kind"] for rec in rows[0]["noise"])


BAD_INPUTS = [
    (['{"prompt": "p", "responses": ["a"]}', '{"prompt": "p", "responses": ["a"'], ":2:", "invalid JSON"),
    (['{"responses": ["a"]}'], ":1:", "missing field 'prompt'"),
    (['{"prompt": 3, "responses": ["a"]}'], ":1:", "'prompt' must be a string"),
    (['{"prompt": "p"}'], ":1:", "missing field 'responses'"),
    (['{"prompt": "p", "responses": "a"}'], ":1:", "must be a list of strings"),
    (['{"prompt": "p", "responses": []}'], ":1:", "at least 1 response"),
    (['{"prompt": "p", "responses": ["a", null]}'], ":1:", "'responses[1]' must be a string"),
    (['{"id": 1, "prompt": "p", "responses": ["a"]}', '{"id": "1", "prompt": "p", "responses": ["b"]}'],
     ":2:", "duplicate id '1' (first on line 1)"),
    (['{"id": true, "prompt": "p", "responses": ["a"]}'], ":1:", "'id' must be a string or an integer"),
    (['[1, 2]'], ":1:", "expected a JSON object"),
]


@pytest.mark.parametrize("lines, where, message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_leaves_output_alone(tmp_path, capsys, lines, where, message):
    path = tmp_path / "bad.jsonl"
    # Validation reads the whole file before any ranking starts, so a bad later line still fails fast.
    write_lines(path, lines)
    out = tmp_path / "out.jsonl"
    out.write_text("previous contents\n")
    assert main(["rank", "--input", str(path), "--output", str(out), "--embedder", "lexical"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}{where}" in err[0] and message in err[0], err
    assert out.read_text() == "previous contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out.jsonl"]  # no temp file left


def test_workers_must_be_positive(good_input, tmp_path, capsys):
    assert main(["rank", "--input", str(good_input), "--output", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_real_subprocess(repo_root, good_input, tmp_path):
    exe = repo_root / ".venv" / "bin" / "selfrank"
    out = tmp_path / "out.jsonl"
    done = subprocess.run([str(exe), "rank", "--input", str(good_input), "--output", str(out), "--embedder", "lexical"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in read_rows(out)] == ["first", "3", "12"]

    bad = tmp_path / "bad.jsonl"
    write_lines(bad, [json.dumps(ROWS[0]), '{"prompt": "p", "responses": [1]}'])
    out_bad = tmp_path / "never.jsonl"
    done = subprocess.run([str(exe), "rank", "--input", str(bad), "--output", str(out_bad)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfrank: error: ") and f"{bad}:2:" in lines[0]
    assert "Traceback" not in done.stderr and not out_bad.exists()


def test_fields_selfrank_does_not_know_are_kept_in_place(tmp_path):
    rows = [{"gold": "north", "id": "a", "prompt": "Where?", "meta": {"source": "survey", "n": [1, 2]},
             "responses": ["North.", "It is north.", "Pizza."], "note": None, "scores": "the user's own"},
            {"prompt": "Plans?", "gold": ["cinema"], "responses": ["Cinema.", "The cinema."]}]
    source = tmp_path / "in.jsonl"
    write_lines(source, [json.dumps(r) for r in rows])
    out = tmp_path / "out.jsonl"
    assert main(["rank", "--input", str(source), "--output", str(out), "--embedder", "lexical"]) == 0
    first, second = read_rows(out)
    added = ["order", "clusters", "representatives", "pairs", "noise"]
    assert list(first) == ["gold", "id", "prompt", "meta", "responses", "note", "scores", *added]
    assert first["gold"] == "north" and first["meta"] == {"source": "survey", "n": [1, 2]} and first["note"] is None
    assert isinstance(first["scores"], list) and len(first["scores"]) == 3  # a field of ours is rewritten
    assert list(second) == ["id", "prompt", "gold", "responses", "scores", *added]  # a new id goes first
    assert second["id"] == "2" and second["gold"] == ["cinema"]

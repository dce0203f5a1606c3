"""Credential masking in configs and log records."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from selfrank.launch.secrets import (MASK, RedactingFilter, env_secrets, install_log_redaction, is_secret_variable,
                            is_sensitive_key, redact, redact_text)
from selfrank.train.config import ExperimentConfig

SECRET = "s3cr3t-Value-0123456789abcdef"


def test_sensitive_keys_are_matched_word_by_word():
    for key in ("api_key", "hub_token", "WANDB_API_KEY", "hubToken", "password", "client-secret", "auth"):
        assert is_sensitive_key(key), key
    for key in ("max_new_tokens", "tokenizer", "keys", "monkey", "n_embd", "kl_coef", "name", 3):
        assert not is_sensitive_key(key), key
    assert is_secret_variable("HF_TOKEN") and is_secret_variable("WANDB_API_KEY")
    assert not is_secret_variable("PWD") and not is_secret_variable("SSH_AUTH_SOCK")
    assert not is_secret_variable("WANDB_API_URL")


def test_redact_masks_keys_nested_and_keeps_the_rest():
    data = {"model": {"name": "gpt2", "hub_token": "hf_abc", "use_auth_token": True, "api_key": None},
            "runs": [{"password": 1234}, {"lr": 1e-4}], "max_new_tokens": 64}
    out = redact(data, secrets=[])
    assert out["model"] == {"name": "gpt2", "hub_token": MASK, "use_auth_token": True, "api_key": None}
    assert out["runs"] == [{"password": MASK}, {"lr": 1e-4}]
    assert out["max_new_tokens"] == 64
    assert data["model"]["hub_token"] == "hf_abc", "the input is not modified"


def test_redact_masks_environment_secrets_inside_any_string(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-" + "9" * 12)
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to mask safely
    found = env_secrets()
    assert SECRET in found and "tok-" + "9" * 12 in found and "abc" not in found
    url = f"https://user:{SECRET}@example.org/data.jsonl"
    assert redact_text(url) == "https://user:***@example.org/data.jsonl"
    out = redact({"task": {"train": url, "notes": (SECRET, "abc")}})
    assert out["task"]["train"] == "https://user:***@example.org/data.jsonl"
    assert out["task"]["notes"] == (MASK, "abc")


def test_redact_accepts_experiment_dataclasses(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    config = ExperimentConfig(name="run1")
    config.task.train = f"/data/{SECRET}/train.jsonl"
    out = redact(config)
    assert out["name"] == "run1" and out["sft"]["lr"] == config.sft.lr
    assert out["sample"]["max_new_tokens"] == config.sample.max_new_tokens
    assert SECRET not in repr(out)


def test_filter_masks_message_arguments_and_traceback():
    flt = RedactingFilter(secrets=[SECRET])
    try:
        raise RuntimeError(f"bad key {SECRET}")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "token=%s n=%d", (SECRET, 3), sys.exc_info())
    assert flt.filter(record) is True
    text = logging.Formatter().format(record)
    assert "token=*** n=3" in text and "RuntimeError: bad key ***" in text
    assert SECRET not in text


@dataclass
class _Capture(logging.Handler):
    lines: list = field(default_factory=list)

    def __post_init__(self):
        logging.Handler.__init__(self)

    def emit(self, record):
        self.lines.append(self.format(record))

    def __hash__(self):
        return id(self)


def test_install_covers_child_loggers_and_handlers_added_later(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    install_log_redaction()
    capture = _Capture()
    child = logging.getLogger("selfrank.test.deep.child")
    child.addHandler(capture)  # added after installation, on a child logger
    child.setLevel(logging.INFO)
    try:
        child.info("connecting with %s", SECRET)
        child.warning(f"inline {SECRET} in an f-string")
    finally:
        child.removeHandler(capture)
    assert capture.lines == ["connecting with ***", "inline *** in an f-string"]
    assert install_log_redaction() is install_log_redaction(), "installing twice keeps one factory"

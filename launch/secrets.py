"""Keep credentials out of everything selfrank writes: tracked configs, run folders and logs.

Two rules, applied together:

* a value stored under a key that names a credential (``api_key``, ``hub_token``, ``password``...)
  is replaced by ``***`` whatever it is;
* any string that contains the value of a credential found in the environment (``WANDB_API_KEY``,
  ``HF_TOKEN``, ...) has that value replaced by ``***``, wherever it appears.

Key names are matched word by word (``max_new_tokens`` holds no credential; ``hub_token`` does), so
ordinary settings are never hidden by accident.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Iterable, Mapping

MASK = "***"

# Words that mark a key (or an environment variable) as holding a credential.
SENSITIVE_WORDS = frozenset({
    "key", "apikey", "token", "secret", "password", "passwd", "api", "credential", "credentials",
    "auth", "authorization", "cookie",
})
# Environment variables are matched more narrowly: WANDB_API_URL or SSH_AUTH_SOCK name no credential,
# and masking their values would only garble paths and addresses in logs.
SENSITIVE_ENV_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credentials"})
# Environment variables that always hold credentials, whatever the rule above says.
KNOWN_SECRET_VARS = (
    "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "OPENAI_API_KEY",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GITHUB_TOKEN", "GH_TOKEN",
)
# Shorter values are too likely to occur by chance ("1", "true") to be masked inside other text.
MIN_SECRET_LENGTH = 8

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def _words(name: str) -> set[str]:
    return {w.lower() for w in _WORD_SPLIT.split(name) if w}


def is_sensitive_key(key: Any) -> bool:
    """True when a mapping key names a credential (``api_key``, ``hubToken``; not ``max_new_tokens``)."""
    return isinstance(key, str) and bool(_words(key) & SENSITIVE_WORDS)


def is_secret_variable(name: str) -> bool:
    """True when an environment variable holds a credential (``WANDB_API_KEY``, ``HF_TOKEN``)."""
    return name in KNOWN_SECRET_VARS or bool(_words(name) & SENSITIVE_ENV_WORDS)


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's credential variables, longest first (so overlaps mask fully)."""
    environ = os.environ if environ is None else environ
    found = {
        value for name, value in environ.items()
        if is_secret_variable(name) and isinstance(value, str)
        and len(value.strip()) >= MIN_SECRET_LENGTH
    }
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every occurrence of a secret replaced by ``***``."""
    for secret in env_secrets() if secrets is None else secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(obj: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of ``obj`` (mappings, lists, tuples, dataclasses, scalars) with credentials masked.

    ``secrets`` defaults to the credentials found in the environment now.
    """
    secrets = env_secrets() if secrets is None else [s for s in secrets if s]
    return _redact(obj, secrets)


def _redact(obj: Any, secrets: list[str]) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            # Booleans and None say whether a credential is used, not what it is: keep them.
            if is_sensitive_key(key) and value is not None and not isinstance(value, bool):
                out[key] = MASK
            else:
                out[key] = _redact(value, secrets)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


class RedactingFilter(logging.Filter):
    """Masks secrets in a log record's final message and traceback text; never drops a record."""

    def __init__(self, secrets: Iterable[str] | None = None):
        super().__init__()
        self._fixed = list(secrets) if secrets is not None else None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the environment (call after a credential is set or changed)."""
        self.secrets = self._fixed if self._fixed is not None else env_secrets()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        clean = redact_text(message, self.secrets)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.secrets)
        return True


_installed: RedactingFilter | None = None


def install_log_redaction() -> RedactingFilter:
    """Mask secrets in every log record of this process, whatever logger or handler it goes through.

    A filter on the root logger would miss records that propagate from child loggers, and one on
    each handler would miss handlers added later, so the filter runs inside the record factory.
    Idempotent: a second call only re-reads the environment.
    """
    global _installed
    if _installed is not None:
        _installed.refresh()
        return _installed
    redactor = RedactingFilter()
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redactor.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = redactor
    return redactor

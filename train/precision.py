"""How the trained models compute: ``model.mixed_precision`` (``no`` / ``bf16`` / ``fp16``), the one setting.

``model.dtype`` says how weights are stored and loaded; ``model.mixed_precision`` how forwards compute:

* without DeepSpeed, ``bf16``/``fp16`` is accelerate's native mixed precision: forwards of the prepared
  (trained) module and of the frozen ones run under ``torch.autocast``, weights, gradients and optimizer
  states stay float32 (the master copy), and fp16 adds a gradient scaler;
* under DeepSpeed it switches on the JSON's ``bf16`` / ``fp16`` section (DeepSpeed computes with 16-bit
  weights and keeps float32 master weights in its optimizer); the shipped JSONs leave ``enabled`` at
  ``"auto"`` so that this setting fills it in.

One source of truth: the Accelerator is created with this value. A launcher that asks for another one
(``accelerate launch --mixed_precision bf16`` with ``model.mixed_precision: no``) or a DeepSpeed JSON
whose ``bf16``/``fp16`` section says otherwise is refused with one line; a launcher left at its default
``no`` defers to the config. Training half-precision weights without a float32 master copy (``model.dtype:
bfloat16`` outside DeepSpeed's mixed precision) is refused too: in bfloat16, ``0.05 + 3e-5 == 0.05``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from selfrank.errors import UserError

__all__ = ["launcher_precision", "deepspeed_json_precision", "check_precision_request", "check_trainable_dtype",
           "HALF_DTYPES"]

HALF_DTYPES = (torch.bfloat16, torch.float16)
_LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"


def launcher_precision() -> str | None:
    """What ``accelerate launch --mixed_precision`` (or its config file) asked for; None outside a launcher."""
    value = os.environ.get(_LAUNCHER_ENV, "").strip().lower()
    return value or None


def deepspeed_json_precision(ds_config: dict) -> dict[str, bool]:
    """The ``bf16``/``fp16`` sections of a DeepSpeed JSON that state ``enabled`` explicitly (not ``"auto"``)."""
    explicit = {}
    for key in ("bf16", "fp16"):
        section = ds_config.get(key)
        if isinstance(section, dict) and "enabled" in section and section["enabled"] != "auto":
            explicit[key] = str(section["enabled"]).lower() == "true"
    return explicit


def _launched_deepspeed_config() -> tuple[dict, str] | None:
    """The DeepSpeed JSON of this launch (accelerate passes its path in the environment), and its name."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if not path or path.lower() == "none" or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")), path
    except (OSError, ValueError) as exc:
        raise UserError(f"DeepSpeed config {path}: not readable JSON ({exc})") from None


def check_precision_request(mixed_precision: str) -> None:
    """Refuse, in one line, a launch whose precision settings disagree with ``model.mixed_precision``.

    Checked before the Accelerator exists (accelerate would otherwise keep an explicit DeepSpeed section
    silently, or raise with a traceback)."""
    launcher = launcher_precision()
    if launcher not in (None, "no", mixed_precision):
        raise UserError(f"model.mixed_precision is {mixed_precision!r} but the launcher asks for --mixed_precision "
                        f"{launcher}: the config's setting decides; launch with --mixed_precision no (or "
                        f"{mixed_precision}), or set model.mixed_precision: {launcher}")
    launched = _launched_deepspeed_config()
    if launched is not None:
        ds_config, path = launched
        for key, enabled in deepspeed_json_precision(ds_config).items():
            if enabled != (mixed_precision == key):
                raise UserError(f"DeepSpeed config {path}: {key}.enabled is {str(enabled).lower()} but "
                                f"model.mixed_precision is {mixed_precision!r}; set {key}.enabled to \"auto\" "
                                f"(model.mixed_precision decides)")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("model.mixed_precision: fp16 needs a CUDA GPU (autocast to float16 and its gradient "
                        "scaler run there only); use bf16 on CPU")


def check_trainable_dtype(params: Iterable[torch.nn.Parameter], deepspeed_mixed: bool) -> None:
    """Refuse to train 16-bit weights without a float32 master copy.

    ``deepspeed_mixed``: DeepSpeed runs with bf16/fp16 on, so its optimizer keeps float32 master weights."""
    if deepspeed_mixed:
        return
    half = sorted({str(p.dtype).replace("torch.", "") for p in params if p.requires_grad and p.dtype in HALF_DTYPES})
    if half:
        raise UserError(f"model.dtype: {half[0]} weights would be trained without a float32 master copy (in "
                        f"{half[0]}, updates smaller than ~1/256 of a weight are lost: 0.05 + 3e-5 == 0.05); use "
                        f"model.dtype: float32 with model.mixed_precision: bf16")

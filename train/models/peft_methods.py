"""Which weights an SFT method trains: full, LoRA, BitFit, bottleneck adapters, or none.

``prepare(model, method, cfg)`` returns the module to optimise with ``requires_grad`` set accordingly.
Saving keeps every model folder a plain causal LM:

* LoRA (via ``peft``) is merged into the weights before saving (:func:`merged`).
* Bottleneck adapters (Houlsby-style, one after each block's MLP: ``h + up(gelu(down(h)))``, ``up``
  zero-initialised so training starts from the base model) cannot be merged, because of the
  non-linearity. They live as a submodule ``bottleneck_adapter`` of each MLP and are applied by a
  forward hook. On save the base weights go to the usual ``model.safetensors`` (without adapter keys, so
  the folder still loads as the base architecture) and the adapters to ``adapters.safetensors`` with
  their size in ``adapters.json``; :func:`load_adapters_if_any` re-attaches them on load.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from selfrank.atomic import write_json
from selfrank.errors import UserError

from selfrank.train.config import SFTConfig

ADAPTER_ATTR = "bottleneck_adapter"
ADAPTER_CONFIG = "adapters.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
# A transformer block's feed-forward module: "<...>.<layer index>.<mlp name>" in the common architectures.
_MLP_NAME = re.compile(r"\.\d+\.(mlp|feed_forward|ffn)$")


class BottleneckAdapter(nn.Module):
    """Residual bottleneck ``h + up(gelu(down(h)))``; the identity at initialisation."""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


def _adapter_hook(module: nn.Module, inputs, output):
    # A module-level function (not a closure) so that deep copies of the model keep working hooks.
    adapter = getattr(module, ADAPTER_ATTR)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(name, module) for name, module in model.named_modules() if _MLP_NAME.search("." + name)]
    if not found:
        raise UserError("sft.method: adapter needs transformer blocks with an 'mlp'/'feed_forward' module; "
                        f"none found in {type(model).__name__}")
    return found


def add_adapters(model: nn.Module, size: int) -> list[BottleneckAdapter]:
    """Attach one adapter after each block's MLP (idempotent: existing adapters are kept)."""
    hidden = model.config.hidden_size
    adapters = []
    for _, mlp in _mlp_modules(model):
        if not hasattr(mlp, ADAPTER_ATTR):
            param = next(mlp.parameters())
            adapter = BottleneckAdapter(hidden, size).to(device=param.device, dtype=param.dtype)
            mlp.add_module(ADAPTER_ATTR, adapter)
            mlp.register_forward_hook(_adapter_hook)
        adapters.append(getattr(mlp, ADAPTER_ATTR))
    return adapters


def has_adapters(model: nn.Module) -> bool:
    return any(name.endswith(ADAPTER_ATTR) for name, _ in model.named_modules())


def prepare(model: nn.Module, method: str, cfg: SFTConfig) -> nn.Module:
    """Set which parameters train for ``method``; returns the module to optimise (a PeftModel for LoRA)."""
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "none":
        model.requires_grad_(False)
        return model
    if method == "bitfit":
        model.requires_grad_(False)
        biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
        if not biases:
            biases = add_zero_biases(model)
        for p in biases:
            p.requires_grad_(True)
        return model
    if method == "adapter":
        model.requires_grad_(False)
        for adapter in add_adapters(model, cfg.adapter_size):
            adapter.requires_grad_(True)
        return model
    if method == "lora":
        return with_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, "sft.method")
    raise UserError(f"sft.method: unknown method {method!r}")


# Config switches that give a bias-free architecture its bias terms (Llama, Mistral-style configs).
BIAS_FLAGS = ("attention_bias", "mlp_bias")


def missing_bias_names(model_config) -> dict[str, tuple[int, ...]]:
    """Bias parameters (name -> shape) that the architecture of ``model_config`` would have with its
    :data:`BIAS_FLAGS` on, and has not now. Built on the meta device: no memory, no weights."""
    import copy

    from transformers import AutoModelForCausalLM

    flags = [flag for flag in BIAS_FLAGS if getattr(model_config, flag, None) is False]
    if not flags:
        return {}
    with_bias = copy.deepcopy(model_config)
    for flag in flags:
        setattr(with_bias, flag, True)
    with torch.device("meta"):
        before = AutoModelForCausalLM.from_config(model_config)
        after = AutoModelForCausalLM.from_config(with_bias)
    have = {name for name, _ in before.named_parameters()}
    return {name: tuple(p.shape) for name, p in after.named_parameters() if name.endswith(".bias") and name not in have}


def check_bitfit(model_config, architecture: str) -> None:
    """Refuse BitFit for a model that has no bias terms and no switch to add them (before any writing)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    if any(name.endswith(".bias") for name, _ in skeleton.named_parameters()):
        return
    if not missing_bias_names(model_config):
        raise UserError(f"sft.method: bitfit trains bias terms, and {architecture} has none (nor a config switch "
                        f"such as {' / '.join(BIAS_FLAGS)} to add them); use lora or adapter")


def add_zero_biases(model: nn.Module) -> list[nn.Parameter]:
    """BitFit on a bias-free architecture (Llama): switch on its bias flags (:data:`BIAS_FLAGS`) and give
    every linear layer those flags govern a zero bias, so the model computes exactly what it did; the
    saved config carries the flags, so the folder reloads with the trained biases. Returns them."""
    wanted = missing_bias_names(model.config)
    if not wanted:
        raise UserError(f"sft.method: bitfit trains bias terms, and {type(model).__name__} has none (nor a config "
                        f"switch such as {' / '.join(BIAS_FLAGS)} to add them); use lora or adapter")
    modules = dict(model.named_modules())
    added = []
    for name, shape in wanted.items():
        owner = modules[name.rsplit(".", 1)[0]]
        weight = owner.weight
        bias = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        owner.bias = bias
        added.append(bias)
    for flag in BIAS_FLAGS:
        if getattr(model.config, flag, None) is False:
            setattr(model.config, flag, True)
    return added


def with_lora(model: nn.Module, r: int, alpha: int, dropout: float = 0.0, field: str = "sft.method") -> nn.Module:
    """``model`` wrapped by peft with LoRA adapters on every linear layer (only they train); the
    adapters start as the identity (B = 0), so the wrapped model computes what ``model`` did."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM", fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise UserError(f"{field}: lora cannot wrap {type(model).__name__}: {exc}") from None


class AdapterDisabled(nn.Module):
    """A LoRA model's base model, without a copy: calls the model with its adapters switched off.

    The wrapped model is deliberately not a submodule (it belongs to the trainer's engine; this view
    must not be registered, prepared or saved on its own)."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_peft_model", peft_model)

    def forward(self, *args, **kwargs):
        with self._peft_model.disable_adapter():
            return self._peft_model(*args, **kwargs)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged(model: nn.Module) -> nn.Module:
    """The plain causal LM behind ``model``: LoRA weights merged in, other models unchanged."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def save_pretrained_with_adapters(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` (safetensors); adapter weights, if any, go to their own file beside it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if not has_adapters(model):
        model.save_pretrained(folder)
        return
    state = model.state_dict()
    base = {k: v for k, v in state.items() if f".{ADAPTER_ATTR}." not in k}
    adapters = {k: v.detach().cpu().contiguous() for k, v in state.items() if f".{ADAPTER_ATTR}." in k}
    model.save_pretrained(folder, state_dict=base)
    save_file(adapters, str(folder / ADAPTER_WEIGHTS))
    size = next(m for m in model.modules() if isinstance(m, BottleneckAdapter)).down.out_features
    write_json(folder / ADAPTER_CONFIG, {"kind": "bottleneck", "size": size, "keys": sorted(adapters)})


def load_adapters_if_any(model: nn.Module, folder: Path) -> bool:
    """Re-attach the adapters saved in ``folder`` (if it has any); returns whether it did."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        return False
    try:
        meta = json.loads(config_path.read_text())
        size = int(meta["size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_path}: not a valid adapter description ({exc})") from None
    add_adapters(model, size)
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    missing, unexpected = [], []
    own = {k for k in model.state_dict() if f".{ADAPTER_ATTR}." in k}
    missing = sorted(own - set(weights))
    unexpected = sorted(set(weights) - own)
    if missing or unexpected:
        raise UserError(f"{folder / ADAPTER_WEIGHTS}: adapter weights do not match the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(weights, strict=False)
    return True

"""Policy models and tokenizers: the tiny offline model, hub/local causal LMs, and safe save/load.

Every model folder this project writes is a plain ``save_pretrained`` folder (safetensors weights plus
the tokenizer), so any stage, or any other tool, can load it with ``AutoModelForCausalLM``. The one
exception is a model trained with bottleneck adapters, which cannot be merged into the base weights:
its folder holds the base weights as usual plus ``adapters.json`` / ``adapters.safetensors``, and
:func:`load_model` re-attaches the adapters (see ``train/peft_methods.py``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from selfrank.atomic import atomic_folder
from selfrank.errors import UserError
from selfrank.logs import quieter

from selfrank.train.config import ModelConfig, TinyModelConfig
from selfrank.train.models.pretrained import resolve_model_source

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
# Pickled weight files execute code when loaded; this project reads safetensors only.
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
                   "model.ckpt.index")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        extra_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    EOS and PAD are distinct special tokens: a model trained with pad == eos would learn to ignore its
    own stop token wherever padding is masked. ``extra_tokens`` (the prompt markers) are added as
    special tokens so that they are never split and never appear in decoded answers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN, PAD_TOKEN, *[t for t in extra_tokens if t not in (EOS_TOKEN, PAD_TOKEN)]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    # Markers swallow the space before them ("... cat <a>" -> "Ġcat", "<a>"), so no lone "Ġ" token sits
    # in front of every marker.
    core.add_special_tokens([_marker(t) for t in specials[2:]])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=None, pad_token=PAD_TOKEN,
        extra_special_tokens=[_marker(t) for t in specials[2:]], padding_side="left", truncation_side="left",
        clean_up_tokenization_spaces=False)
    return tokenizer


def _marker(token: str):
    from tokenizers import AddedToken

    return AddedToken(token, special=True, lstrip=True, rstrip=False, normalized=False)


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised GPT-2-shaped model sized for ``tokenizer``."""
    # GPT-2's own activation (tanh-approximated GELU) as one fused kernel: "gelu_new" computes the same
    # function (measured max difference 2.4e-7) in five elementwise ops, about 12% of a tiny model's PPO time.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        activation_function="gelu_pytorch_tanh")
    tokenizer.model_max_length = cfg.n_positions
    model = GPT2LMHeadModel(config)
    _sync_special_ids(model, tokenizer)
    return model


def _sync_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    for target in (model.config, model.generation_config):
        if target is None:
            continue
        target.pad_token_id = tokenizer.pad_token_id
        target.eos_token_id = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None:
            target.bos_token_id = tokenizer.bos_token_id


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_local_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"model.name: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"model.name: {folder} has no config.json (not a save_pretrained folder)")
    if not any(folder.glob("*.safetensors")):
        pickled = [name for name in _PICKLE_WEIGHTS if (folder / name).exists()]
        what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no *.safetensors weights"
        raise UserError(f"model.name: {folder} has {what}; weights must be safetensors (convert once with "
                        f"AutoModelForCausalLM.from_pretrained(...).save_pretrained(folder) in a trusted setting)")


def load_causal_lm(name_or_path: str, model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub name, a local ``save_pretrained`` folder, or a GGUF
    model (a packaged short name or a ``.gguf`` file, converted once: see ``train/models/pretrained.py``).

    Guarantees a pad token distinct from EOS (adding ``PAD_TOKEN`` and growing the embeddings if needed)
    and left padding (decoder-only generation appends at the right).
    """
    name_or_path = resolve_model_source(name_or_path)
    local = Path(name_or_path).expanduser()
    is_local = local.exists() or name_or_path.startswith((".", "/", "~"))
    if is_local:
        _check_local_folder(local)
        source, revision = str(local), None
    else:
        source, revision = name_or_path, model_cfg.revision
    kwargs = dict(trust_remote_code=model_cfg.trust_remote_code, revision=revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(model_cfg.dtype),
                                                     use_safetensors=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        if is_local:
            raise UserError(f"model.name: cannot load {source}: {str(exc).splitlines()[0]}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("the hub is offline (HF_HUB_OFFLINE is set): download it once where the hub is reachable "
                "(save_pretrained) and give the local folder" if offline else
                "check the spelling, or give a local save_pretrained folder (set HF_HUB_OFFLINE=1 without network)")
        raise UserError(f"model.name: cannot load {name_or_path!r} ({type(exc).__name__}); {hint}") from None
    _ensure_pad(model, tokenizer)
    return model, tokenizer


def check_model_source(model_cfg: ModelConfig) -> None:
    """Refuse a policy model that cannot be loaded, cheaply (folder check or config only), so that a
    run can fail before it writes anything."""
    if model_cfg.name == "tiny":
        return
    name = resolve_model_source(model_cfg.name)  # converts a GGUF model once, so the load is quick
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")):
        _check_local_folder(local)
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, revision=model_cfg.revision,
                                   trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # the full load raises the UserError that explains what to do
        load_causal_lm(name, model_cfg)


def _ensure_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    added = 0
    if tokenizer.eos_token is None:
        added += tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        added += tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if added or model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    _sync_special_ids(model, tokenizer)


def add_extra_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, extra_tokens: Sequence[str]) -> None:
    """Register the prompt markers as special tokens, growing the embeddings when they are new."""
    missing = [t for t in extra_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": [_marker(t) for t in missing]}, replace_extra_special_tokens=False)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))


def init_policy(model_cfg: ModelConfig, train_texts: Sequence[str],
                extra_tokens: Sequence[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy: a tiny model with a tokenizer trained on ``train_texts``, or a loaded LM."""
    if model_cfg.name == "tiny":
        tokenizer = train_bpe_tokenizer(train_texts, model_cfg.tiny.vocab_size, extra_tokens)
        model = build_tiny_model(model_cfg.tiny, tokenizer)
        return model.to(_torch_dtype(model_cfg.dtype)), tokenizer
    model, tokenizer = load_causal_lm(model_cfg.name, model_cfg)
    add_extra_tokens(model, tokenizer, extra_tokens)
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save model (safetensors) and tokenizer into a temporary sibling folder, then rename it over ``folder``.

    A crash leaves either the previous folder or the new one, never a half-written model. A PEFT (LoRA)
    model is merged first so that the folder is a plain causal LM; bottleneck adapters are saved beside
    the base weights (see ``train/peft_methods.py``).
    """
    from selfrank.train.models import peft_methods

    model = peft_methods.merged(model)
    with atomic_folder(folder) as tmp:
        peft_methods.save_pretrained_with_adapters(model, tmp)
        tokenizer.save_pretrained(tmp)


def load_model(folder: Path, model_cfg: ModelConfig | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a folder written by :func:`save_model` (re-attaching bottleneck adapters if it has any)."""
    from selfrank.train.models import peft_methods

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found (run the stage that writes it first)")
    cfg = model_cfg or ModelConfig()
    # Settings of the folder itself, not of the hub model it may have started from.
    cfg = ModelConfig(name=str(folder), tiny=cfg.tiny, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
    # from_pretrained reports unexpected keys at warning level; adapter folders never contain any, but
    # some configs (tied heads) produce noise we do not want in every stage's log.
    with quieter("transformers.modeling_utils", logging.ERROR):
        model, tokenizer = load_causal_lm(str(folder), cfg)
    peft_methods.load_adapters_if_any(model, folder)
    return model, tokenizer


def encode_prompt_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int,
                           add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of ``prompt`` followed by ``response`` (+ EOS) and the prompt's length in tokens.

    The prompt is tokenized on its own, exactly as :func:`train.generation.generate` does, and the
    response is tokenized after a single space (generated answers are decoded and stripped, so this
    reproduces the ids a model emits for them). Too-long inputs lose the oldest prompt tokens first,
    since the end of the prompt (the question and the answer marker) matters most; a response that alone
    exceeds ``max_length - 1`` is cut at the right and then has no EOS (it did not end).
    """
    if max_length < 2:
        raise ValueError("max_length must be >= 2")
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    response_ids = response_token_ids(tokenizer, response)
    if add_eos:
        response_ids = response_ids + [tokenizer.eos_token_id]
    if len(response_ids) > max_length - 1:
        response_ids = response_ids[: max_length - 1]
    room = max_length - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    return prompt_ids + response_ids, len(prompt_ids)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's ids as generation sees them (with the tokenizer's own leading special tokens, if any)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def response_token_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    response = response.strip()
    if not response:
        return []
    return list(tokenizer(" " + response, add_special_tokens=False)["input_ids"])

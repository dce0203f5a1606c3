"""Policy models and tokenizers: the tiny offline model, hub/local causal LMs, and safe save/load.
(Longer than most modules on purpose: loading, saving and the token rules (stop tokens, how a prompt
and its answer are encoded) must agree exactly across SFT, generation, the reward model and PPO.)

Every model folder this project writes is a plain ``save_pretrained`` folder (safetensors weights plus
the tokenizer), so any stage, or any other tool, can load it with ``AutoModelForCausalLM``. The one
exception is a model trained with bottleneck adapters, which cannot be merged into the base weights:
its folder holds the base weights as usual plus ``adapters.json`` / ``adapters.safetensors``, and
:func:`load_model` re-attaches the adapters (see ``train/models/peft_methods.py``).
"""
from __future__ import annotations

import logging
import os
import weakref
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
# A tiny chat tokenizer's turn delimiters and template: ChatML, as SmolLM2's, without a default system
# message. Its end of turn is its EOS.
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
# Pickled weight files execute code when loaded; this project reads safetensors only.
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
                   "model.ckpt.index")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        extra_tokens: Sequence[str] = (), chat: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    EOS and PAD are distinct special tokens: a model trained with pad == eos would learn to ignore its
    own stop token wherever padding is masked. ``extra_tokens`` (the prompt markers) are added as
    special tokens so that they are never split and never appear in decoded answers. ``chat``: a
    ChatML tokenizer instead (``<|im_start|>``/``<|im_end|>`` turns, EOS ``<|im_end|>``, a chat template),
    shaped like SmolLM2's for tests of the chat path.
    """
    if chat:
        return _train_chat_tokenizer(texts, vocab_size)
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


def _train_chat_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN, TURN_START, TURN_END, PAD_TOKEN]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    # Turn delimiters keep the newlines around them (no lstrip/rstrip), as in ChatML.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=TURN_END, bos_token=TURN_START, unk_token=None, pad_token=PAD_TOKEN,
        padding_side="left", truncation_side="left", clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE)


def _marker(token: str):
    from tokenizers import AddedToken

    return AddedToken(token, special=True, lstrip=True, rstrip=False, normalized=False)


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised GPT-2-shaped (or Llama-shaped: ``cfg.architecture``) model sized for ``tokenizer``."""
    if cfg.architecture == "llama":
        return _build_tiny_llama(cfg, tokenizer)
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


def _build_tiny_llama(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """SmolLM2's architecture in miniature: grouped key/value heads (half as many as query heads, when
    even), tied input/output embeddings, no bias terms, SiLU-gated MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kv_heads = cfg.n_head // 2 if cfg.n_head % 2 == 0 else cfg.n_head
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=kv_heads, max_position_embeddings=cfg.n_positions,
                         tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    tokenizer.model_max_length = cfg.n_positions
    model = LlamaForCausalLM(config)
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


def init_policy(model_cfg: ModelConfig, train_texts: Sequence[str], extra_tokens: Sequence[str],
                style: str = "markers") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy: a tiny model with a tokenizer trained on ``train_texts``, or a loaded LM.

    ``style`` (``task.prompt.style``): the prompt markers ``extra_tokens`` are registered only for
    marker prompts; a tiny model for chat prompts gets a ChatML tokenizer (see ``train_bpe_tokenizer``)."""
    from selfrank.train.data.prompts import resolve_style

    if model_cfg.name == "tiny":
        chat = resolve_style(style, "tiny") == "chat"
        tokenizer = train_bpe_tokenizer(train_texts, model_cfg.tiny.vocab_size, () if chat else extra_tokens,
                                        chat=chat)
        model = build_tiny_model(model_cfg.tiny, tokenizer)
        return model.to(_torch_dtype(model_cfg.dtype)), tokenizer
    model, tokenizer = load_causal_lm(model_cfg.name, model_cfg)
    if resolve_style(style, model_cfg.name, tokenizer) == "markers":
        add_extra_tokens(model, tokenizer, extra_tokens)
    return model, tokenizer


def load_tokenizer(folder: Path, model_cfg: ModelConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder written by :func:`save_model` (no weights loaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found (run the stage that writes it first)")
    trust = bool(model_cfg.trust_remote_code) if model_cfg is not None else False
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save model (safetensors) and tokenizer into a temporary sibling folder, then rename it over ``folder``.

    A crash leaves either the previous folder or the new one, never a half-written model. A PEFT (LoRA)
    model is merged first so that the folder is a plain causal LM; bottleneck adapters are saved beside
    the base weights (see ``train/models/peft_methods.py``).
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
                           add_eos: bool = True, keep_prompt: bool | None = None) -> tuple[list[int], int]:
    """Token ids of ``prompt`` followed by ``response`` (+ its end of turn) and the prompt's length.

    The prompt is tokenized on its own, exactly as :func:`train.sampling.generation.generate` does, and the
    response as the model emits it after that prompt (:func:`response_token_ids`), ended by
    ``stop_token_ids(tokenizer)[0]``: the same ids for SFT's targets, the reward model's texts and what
    PPO scores. A response that alone exceeds ``max_length - 1`` is cut at the right and then has no end
    (it did not end). Too-long inputs then lose the oldest prompt tokens first, since the end of a
    marker prompt (the question and the answer marker) matters most; with ``keep_prompt`` (default:
    whether ``prompt`` is a chat prompt, :func:`is_chat_prompt`; those are fitted to their budget when
    formatted, and cutting their left would cut the template) the response is cut at the right
    instead, as far as the prompt leaves room.
    """
    if max_length < 2:
        raise ValueError("max_length must be >= 2")
    if keep_prompt is None:
        keep_prompt = is_chat_prompt(tokenizer, prompt)
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    response_ids = response_token_ids(tokenizer, response, prompt)
    if add_eos:
        response_ids = response_ids + [end_of_turn_id(tokenizer)]
    room = max_length - len(prompt_ids)
    if keep_prompt and room >= 1:
        return prompt_ids + response_ids[:room], len(prompt_ids)
    if len(response_ids) > max_length - 1:
        response_ids = response_ids[: max_length - 1]
    room = max_length - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    return prompt_ids + response_ids, len(prompt_ids)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's ids as generation sees them (with the tokenizer's own leading special tokens, if any)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def answer_separator(prompt: str | None) -> str:
    """What separates an answer from its prompt: nothing after a prompt ending in whitespace (a chat
    template's generation prompt ends with a newline, and the model then starts its answer with a word
    that carries no space: "France", not " France"), else one space (after a marker such as ``<a>``)."""
    return "" if prompt and prompt[-1].isspace() else " "


def response_token_ids(tokenizer: PreTrainedTokenizerBase, response: str, prompt: str | None = None) -> list[int]:
    """The ids a model emits for ``response`` after ``prompt`` (see :func:`answer_separator`; without a
    prompt, after a marker). Generated answers are decoded and stripped, so this reproduces their ids."""
    response = response.strip()
    if not response:
        return []
    return list(tokenizer(answer_separator(prompt) + response, add_special_tokens=False)["input_ids"])


_STOP_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PROBE_ANSWER = "\u2063selfrank-answer\u2063"


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an answer: the chat template's end of an assistant turn when the tokenizer
    has a template (``<|im_end|>`` for ChatML), else EOS."""
    return stop_token_ids(tokenizer)[0]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end generation, the answer's own end of turn first (:func:`end_of_turn_id`), then
    EOS when it differs. Found once per tokenizer by rendering an assistant turn with the template."""
    return list(_template_facts(tokenizer)[0])


def is_chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> bool:
    """Whether ``prompt`` was rendered by ``tokenizer``'s chat template: it ends with the template's
    generation prompt (``<|im_start|>assistant\n`` for ChatML), which no marker prompt does."""
    suffix = _template_facts(tokenizer)[1]
    return bool(suffix) and prompt.endswith(suffix)


def _template_facts(tokenizer: PreTrainedTokenizerBase) -> tuple[tuple[int, ...], str]:
    """``(stop ids, generation-prompt suffix)`` of a tokenizer, cached while its vocabulary is unchanged."""
    key = (len(tokenizer), getattr(tokenizer, "chat_template", None))
    cached = _STOP_IDS.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    facts = (tuple(_stop_ids(tokenizer)), _generation_suffix(tokenizer))
    _STOP_IDS[tokenizer] = (key, facts)
    return facts


def _generation_suffix(tokenizer: PreTrainedTokenizerBase) -> str:
    if not getattr(tokenizer, "chat_template", None):
        return ""
    messages = [{"role": "user", "content": _PROBE_ANSWER}]
    try:
        bare = tokenizer.apply_chat_template(messages, tokenize=False)
        prompted = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot render a user turn has no usable generation prompt
        return ""
    return prompted[len(bare):] if prompted.startswith(bare) else ""


def _stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    stops = [] if eos is None else [eos]
    turn_end = _template_turn_end(tokenizer)
    if turn_end is not None and turn_end not in stops:
        stops.insert(0, turn_end)
    elif turn_end is not None:
        stops = [turn_end]
    if not stops:
        raise ValueError("the tokenizer has no EOS token (see train.models.causal_lm.load_causal_lm)")
    return stops


def _template_turn_end(tokenizer: PreTrainedTokenizerBase) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"},
                                              {"role": "assistant", "content": _PROBE_ANSWER}], tokenize=False)
    except Exception:  # a template that cannot render an assistant turn: fall back to EOS
        return None
    at = text.find(_PROBE_ANSWER)
    if at < 0:
        return None
    after = tokenizer(text[at + len(_PROBE_ANSWER):], add_special_tokens=False)["input_ids"]
    return after[0] if after and after[0] in set(tokenizer.all_special_ids) else None

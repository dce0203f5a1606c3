"""Checks of the policy settings that can fail only later (prompt style and budget, BitFit's bias
terms), made cheaply from configs and tokenizers before a run writes anything."""
from __future__ import annotations

from pathlib import Path

from selfrank.errors import UserError

from selfrank.train.config import ExperimentConfig
from selfrank.train.data.prompts import MIN_CHAT_BUDGET, answer_room, check_prompt_budget, format_task, resolve_style
from selfrank.train.models.pretrained import resolve_model_source


def _source(config: ExperimentConfig) -> tuple[str, dict]:
    name = resolve_model_source(config.model.name)
    local = Path(name).expanduser()
    if local.exists():
        return str(local), {"trust_remote_code": config.model.trust_remote_code}
    return name, {"trust_remote_code": config.model.trust_remote_code, "revision": config.model.revision}


def prompt_style(config: ExperimentConfig) -> str:
    """The run's prompt style (``markers`` or ``chat``), from the configured model's tokenizer."""
    return resolve_style(config.task.prompt.style, config.model.name, _tokenizer(config))


def _tokenizer(config: ExperimentConfig):
    """The configured pre-trained model's tokenizer (None for the tiny model, which trains its own, and
    for marker prompts, which need none to be told apart)."""
    if config.model.name == "tiny" or config.task.prompt.style == "markers":
        return None
    from transformers import AutoTokenizer

    source, kwargs = _source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # the model check that follows explains a model that cannot load
        raise UserError(f"model.name: cannot read the tokenizer of {config.model.name!r} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return tokenizer


def _model_config(config: ExperimentConfig):
    if config.model.name == "tiny":
        tiny = config.model.tiny
        if tiny.architecture == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(vocab_size=tiny.vocab_size, hidden_size=tiny.n_embd, intermediate_size=4 * tiny.n_embd,
                               num_hidden_layers=tiny.n_layer, num_attention_heads=tiny.n_head,
                               attention_bias=False, mlp_bias=False)
        from transformers import GPT2Config

        return GPT2Config(vocab_size=tiny.vocab_size, n_embd=tiny.n_embd, n_layer=tiny.n_layer, n_head=tiny.n_head)
    from transformers import AutoConfig

    source, kwargs = _source(config)
    return AutoConfig.from_pretrained(source, **kwargs)


def check_policy_settings(config: ExperimentConfig, sft_todo: bool, data=None) -> None:
    """Refuse settings that cannot work: chat prompts without room (``check_prompt_budget``) or, with
    the task's examples ``data`` and a pre-trained model's tokenizer, a question that alone exceeds that
    room; BitFit on a model with no bias terms and no switch to add them (when SFT will run)."""
    tokenizer = _tokenizer(config)
    if resolve_style(config.task.prompt.style, config.model.name, tokenizer) == "chat":
        check_prompt_budget(config)
        if data is not None and tokenizer is not None:
            format_task(data, tokenizer, config)  # every prompt fits, or the example is named
        if config.model.name == "tiny" and config.model.tiny.n_positions - answer_room(config) < MIN_CHAT_BUDGET:
            raise UserError(f"model.tiny.n_positions: {config.model.tiny.n_positions} leaves too little room for "
                            "chat prompts beside the longest max_new_tokens")
    methods = {config.sft.method, *config.sft.baselines}
    if sft_todo and "bitfit" in methods:
        from selfrank.train.models.peft_methods import check_bitfit

        model_config = _model_config(config)
        check_bitfit(model_config, f"{config.model.name!r} ({type(model_config).__name__})")


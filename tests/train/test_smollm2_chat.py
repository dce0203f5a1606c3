"""The pre-trained SmolLM2-135M-Instruct with chat prompts: no marker tokens, its own template and end of
turn, truncation that keeps the template, and one token sequence for an answer everywhere: what SFT
trains on, what generation produces, what the reward model scores and what PPO's log-probs cover."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from selfrank.train.config import ModelConfig, PromptFormat, TaskConfig
from selfrank.train.data.prompts import ChatPrompter, format_task, prompt_markers, qa_parts
from selfrank.train.data.tasks import load_task
from selfrank.train.models.causal_lm import encode_prompt_response, init_policy, stop_token_ids
from selfrank.train.models.reward_model import encode_pairs
from selfrank.train.sampling.generation import generate
from selfrank.train.stages.sft import tokenize_examples

from tests.train.helpers import tiny_config

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return init_policy(ModelConfig(name=NAME), [], prompt_markers(PromptFormat()), style="auto")


def test_auto_style_adds_no_marker_tokens_and_stops_at_im_end(smollm2):
    model, tokenizer = smollm2
    assert "<a>" not in tokenizer.get_vocab()  # markers would be new, untrained tokens
    assert len(tokenizer) == 49153 and tokenizer.pad_token == "<|pad|>"  # only the distinct pad was added
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")] == [2]
    _, marked = init_policy(ModelConfig(name=NAME), [], prompt_markers(PromptFormat()), style="markers")
    assert "<a>" in marked.get_vocab()


def test_system_message_replaces_the_template_default(smollm2):
    _, tokenizer = smollm2
    parts = qa_parts("Paris is the capital of France.", "What is the capital of France?")
    default = ChatPrompter(tokenizer, PromptFormat(style="chat"), 1000)(parts)
    short = ChatPrompter(tokenizer, PromptFormat(style="chat", system="Be brief."), 1000)(parts)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert short.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert len(tokenizer(default)["input_ids"]) - len(tokenizer(short)["input_ids"]) > 10


def test_long_squad_context_is_cut_inside_the_template(smollm2, shared_data):
    _, tokenizer = smollm2
    task = TaskConfig(kind="qa", train=str(shared_data / "squad_v2" / "dev.jsonl"), max_train=30, max_validation=4,
                      max_test=4, prompt=PromptFormat(style="auto", system="Be brief.", max_tokens=96))
    config = dataclasses.replace(tiny_config(), task=task, model=ModelConfig(name=NAME))
    data = load_task(task)
    chat = format_task(data, tokenizer, config)
    cut = 0
    for before, after in zip(data.train, chat.train):
        ids = tokenizer(after.prompt)["input_ids"]
        assert len(ids) <= 96
        assert after.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnswer the "
                                       "question using the context.\n\nContext: ")
        question = " ".join(before.parts.question.split())
        assert after.prompt.endswith(f"\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n")
        passage = " ".join(before.parts.context[0].split())
        kept = after.prompt.split("Context: ", 1)[1].rsplit("\n\nQuestion: ", 1)[0]
        assert passage.endswith(kept)
        cut += kept != passage
    assert cut > 20  # SQuAD passages are longer than this budget: most were cut


def test_generated_answer_ids_are_the_ids_sft_and_the_reward_model_use(smollm2):
    model, tokenizer = smollm2
    prompter = ChatPrompter(tokenizer, PromptFormat(style="chat", system="Answer in a few words."), 200)
    prompts = [prompter(qa_parts("The Eiffel Tower is in Paris, the capital of France.", "Where is the Eiffel Tower?")),
               prompter(qa_parts("Marie Curie won the Nobel Prize in Physics in 1903.", "Who won the prize in 1903?"))]
    gen = generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=24)
    assert bool(gen.ended.all()), gen.texts  # both answers ended with <|im_end|>
    encoded = encode_pairs(tokenizer, prompts, gen.texts, 512)
    for row, (prompt, text) in enumerate(zip(prompts, gen.texts)):
        query = gen.query_ids[row][gen.query_mask[row].bool()].tolist()
        response = gen.response_ids[row][gen.response_mask[row].bool()].tolist()
        assert response[-1] == 2 and not tokenizer.convert_ids_to_tokens(response[0]).startswith("Ġ")
        # SFT's example (prompt, answer) and the reward model's text are exactly the generated ids, which
        # are also what PPO's rollout (query + response) scores and takes log-probs of.
        ids, prompt_len = encode_prompt_response(tokenizer, prompt, text, 512)
        assert ids == query + response and prompt_len == len(query)
        assert encoded[row] == query + response
    example = type("Example", (), {"prompt": prompts[0], "target": gen.texts[0]})
    assert tokenize_examples([example], tokenizer, 512) == [(encoded[0], len(tokenizer(prompts[0])["input_ids"]))]


def test_preflight_accepts_bitfit_and_resolves_chat_for_smollm2():
    from selfrank.train.config import SFTConfig
    from selfrank.train.models.preflight import check_policy_settings, prompt_style

    config = dataclasses.replace(tiny_config(), model=ModelConfig(name=NAME), sft=SFTConfig(method="bitfit"))
    assert prompt_style(config) == "chat"
    check_policy_settings(config, sft_todo=True)  # Llama's bias switches make BitFit possible


def test_a_question_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, shared_data, capsys):
    from selfrank.launch.cli import main as cli_main
    from tests.reliability.helpers import error_lines, write_config

    config = write_config(tmp_path, "tight", **{
        "model.name": NAME, "task.kind": "qa", "task.train": str(shared_data / "squad_v2" / "dev.jsonl"),
        "task.max_train": 200, "task.max_validation": 20, "task.max_test": 20, "task.prompt.max_tokens": 40})
    assert cli_main(["run", str(config)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "question and the template alone" in lines[0] and "example " in lines[0], lines
    assert not (tmp_path / "runs").exists()

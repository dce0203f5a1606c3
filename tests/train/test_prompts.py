"""Prompt styles (train/data/prompts.py): marker prompts as before, chat prompts from the template, fitted
to a token budget by cutting the context only; answers tokenized as the model emits them."""
from __future__ import annotations

import dataclasses

import pytest

from selfrank.errors import UserError
from selfrank.train.config import PromptFormat, SyntheticTaskConfig, TaskConfig
from selfrank.train.data.examples import Example, TaskData
from selfrank.train.data.prompts import (ChatPrompter, chat_messages, dialogue_parts, format_task, markers_prompt,
                                          prompt_budget,
                                         qa_parts, resolve_style)
from selfrank.train.data.synthetic import make_task
from selfrank.train.data.tasks import load_task
from selfrank.train.models.causal_lm import (TURN_END, answer_separator, encode_prompt_response, end_of_turn_id,
                                             is_chat_prompt, stop_token_ids, train_bpe_tokenizer)

from tests.train.helpers import tiny_chat_config, tiny_config, tiny_tokenizer

WORDS = ("the river runs past an old stone bridge where people meet every morning to talk about the weather "
         "and the news of the town while children play by the water").split()


@pytest.fixture(scope="module")
def chat_tokenizer():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    texts += ["system\nuser\nassistant\nAnswer the question.\n\nContext: \n\nQuestion: what is it ?"]
    return train_bpe_tokenizer(texts, 400, chat=True)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def test_marker_prompts_keep_their_format():
    fmt = PromptFormat()
    assert markers_prompt(dialogue_parts(["one", "two", "three", "four"]), fmt) == "<c> two three four <a>"  # last 3
    assert markers_prompt(qa_parts("a  long\ncontext", " what  is it ? "), fmt) == "<c> a long context <q> what is it ? <a>"
    ex = make_task(SyntheticTaskConfig(n_train=3, n_validation=1, n_test=1), fmt).train[0]
    assert ex.prompt == f"<c> {ex.parts.context[0]} <q> {ex.parts.question} <a>"


def test_style_resolution(chat_tokenizer):
    plain = tiny_tokenizer()
    assert resolve_style("auto", "tiny", chat_tokenizer) == "markers"  # the tiny model keeps the paper's format
    assert resolve_style("auto", "some/model", chat_tokenizer) == "chat"
    assert resolve_style("auto", "some/model", plain) == "markers"  # no chat template
    assert resolve_style("markers", "some/model", chat_tokenizer) == "markers"
    assert resolve_style("chat", "tiny") == "chat"
    with pytest.raises(UserError, match="chat template"):
        resolve_style("chat", "gpt2", plain)


def test_dialogue_messages_alternate_and_end_with_the_user():
    fmt = PromptFormat(system="Be brief.")
    messages = chat_messages(dialogue_parts(["a", "b", "c"]), fmt, ["a", "b", "c"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in messages] == ["Be brief.", "a", "b", "c"]
    two = chat_messages(dialogue_parts(["a", "b"]), PromptFormat(), ["a", "b"])
    assert [m["role"] for m in two] == ["assistant", "user"]


def test_chat_prompt_within_budget_is_the_template_rendering(chat_tokenizer):
    fmt = PromptFormat(style="chat", system="Be brief.")
    prompt = ChatPrompter(chat_tokenizer, fmt, 200)(qa_parts("the  river\nruns", "what is it ?"))
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnswer the question using the "
                      "context.\n\nContext: the river runs\n\nQuestion: what is it ?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert is_chat_prompt(chat_tokenizer, prompt) and not is_chat_prompt(chat_tokenizer, "<c> x <q> y <a>")


def test_long_qa_passage_loses_its_left_part_never_the_question_or_template(chat_tokenizer):
    passage = " ".join(WORDS * 4)
    fmt = PromptFormat(style="chat", system="Be brief.")
    prompter = ChatPrompter(chat_tokenizer, fmt, 60)
    prompt = prompter(qa_parts(passage, "what is it ?"))
    assert n_tokens(chat_tokenizer, prompt) <= 60 and prompter.cut == 1
    head = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnswer the question using the context."
            "\n\nContext: ")
    tail = "\n\nQuestion: what is it ?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.startswith(head) and prompt.endswith(tail)
    kept = prompt[len(head):-len(tail)]
    assert kept and passage.endswith(" " + kept)  # the passage's end, cut at a word start
    assert n_tokens(chat_tokenizer, prompt.replace(kept, "the " + kept)) > 55  # about as much as fits


def test_long_dialogue_drops_oldest_turns_then_cuts_the_last_turn_from_the_left(chat_tokenizer):
    fmt = PromptFormat(style="chat", max_context_turns=0)
    turns = [" ".join(WORDS[:8]), " ".join(WORDS[8:16]), " ".join(WORDS[16:24])]
    full = ChatPrompter(chat_tokenizer, fmt, 1000)(dialogue_parts(turns))
    two_turns = ChatPrompter(chat_tokenizer, fmt, 1000)(dialogue_parts(turns[1:]))
    fitted = ChatPrompter(chat_tokenizer, fmt, n_tokens(chat_tokenizer, two_turns))(dialogue_parts(turns))
    assert n_tokens(chat_tokenizer, full) > n_tokens(chat_tokenizer, two_turns)
    assert fitted == two_turns  # the oldest turn went first, whole
    short = ChatPrompter(chat_tokenizer, fmt, 16)(dialogue_parts(turns))
    assert n_tokens(chat_tokenizer, short) <= 16
    assert short.startswith("<|im_start|>user\n") and short.endswith("<|im_end|>\n<|im_start|>assistant\n")
    kept = short[len("<|im_start|>user\n"):-len("<|im_end|>\n<|im_start|>assistant\n")]
    assert kept and turns[-1].endswith(kept) and kept != turns[-1]


def test_a_question_longer_than_the_budget_is_refused(chat_tokenizer):
    prompter = ChatPrompter(chat_tokenizer, PromptFormat(style="chat"), 20)
    with pytest.raises(UserError, match="question"):
        prompter(qa_parts("the river", " ".join(WORDS)), "example q1")


def test_answers_follow_chat_prompts_without_a_space_and_end_with_the_turn_end(chat_tokenizer):
    prompt = ChatPrompter(chat_tokenizer, PromptFormat(style="chat"), 200)(qa_parts("the river", "what is it ?"))
    assert answer_separator(prompt) == "" and answer_separator("<c> x <a>") == " "
    turn_end = chat_tokenizer.convert_tokens_to_ids(TURN_END)
    assert stop_token_ids(chat_tokenizer) == [turn_end] == [end_of_turn_id(chat_tokenizer)]
    ids, prompt_len = encode_prompt_response(chat_tokenizer, prompt, " the water ", 200)
    # One tokenization of the text the model produces: prompt, answer, end of turn.
    assert ids == chat_tokenizer(prompt + "the water" + TURN_END)["input_ids"]
    assert ids[:prompt_len] == chat_tokenizer(prompt)["input_ids"] and ids[-1] == turn_end
    assert not chat_tokenizer.convert_ids_to_tokens(ids[prompt_len])[0] == "Ġ"  # no leading space
    # Marker prompts are as before: the answer after one space, then EOS.
    markers = tiny_tokenizer()
    ids, prompt_len = encode_prompt_response(markers, "<c> ann <q> who ? <a>", "ann", 64)
    assert ids[prompt_len:] == markers(" ann")["input_ids"] + [markers.eos_token_id]


def test_chat_prompts_are_never_cut_from_the_left_long_answers_are(chat_tokenizer):
    prompt = ChatPrompter(chat_tokenizer, PromptFormat(style="chat"), 200)(qa_parts("the river", "what is it ?"))
    prompt_ids = chat_tokenizer(prompt)["input_ids"]
    answer = " ".join(WORDS)
    ids, prompt_len = encode_prompt_response(chat_tokenizer, prompt, answer, len(prompt_ids) + 5)
    assert ids[:prompt_len] == prompt_ids and len(ids) == len(prompt_ids) + 5  # the answer lost its tail
    assert ids[prompt_len:] == chat_tokenizer(answer, add_special_tokens=False)["input_ids"][:5]


def test_format_task_renders_chat_prompts_from_parts_and_leaves_markers(chat_tokenizer, tmp_path):
    markers_config = tiny_config(tmp_path)
    data = load_task(markers_config.task)
    assert format_task(data, tiny_tokenizer(markers_config), markers_config) is data
    config = tiny_chat_config(tmp_path)
    chat = format_task(data, chat_tokenizer, config)
    for before, after in zip(data.train, chat.train):
        assert after.id == before.id and after.target == before.target and after.parts == before.parts
        assert after.prompt.startswith("<|im_start|>user\nAnswer.\n\nContext: ")
        assert after.prompt.endswith(f"Question: {before.parts.question}<|im_end|>\n<|im_start|>assistant\n")
        assert n_tokens(chat_tokenizer, after.prompt) <= prompt_budget(config, chat_tokenizer)
    # The budget leaves an answer its room in both SFT's block and the reward model's length.
    assert prompt_budget(config) == min(config.sft.block_size, config.reward.max_length) - 9
    assert prompt_budget(dataclasses.replace(config, task=dataclasses.replace(
        config.task, prompt=PromptFormat(style="chat", max_tokens=40)))) == 40
    bare = TaskData([Example("x", "p", "t", ["t"])], [], [])
    with pytest.raises(ValueError, match="parts"):
        format_task(bare, chat_tokenizer, config)


def test_real_task_parts_render_in_both_styles(shared_data, chat_tokenizer):
    config = tiny_chat_config()
    task = TaskConfig(kind="dialogue", train=str(shared_data / "dailydialog" / "validation.jsonl"), max_train=20,
                      max_validation=5, max_test=5,
                      prompt=dataclasses.replace(config.task.prompt, max_tokens=2000))
    data = load_task(task)
    ex = data.train[0]
    assert ex.prompt == markers_prompt(dialogue_parts(list(ex.parts.context)), PromptFormat())  # markers on load
    chat = format_task(data, chat_tokenizer, dataclasses.replace(config, task=task))
    last_turn = ex.parts.context[-1].strip()
    assert chat.train[0].prompt.endswith(f"{last_turn}<|im_end|>\n<|im_start|>assistant\n")

"""Decoding as the leaderboard does, on the built-in model: lengths set per group, prompts written back, stops."""

from __future__ import annotations

import pytest
import torch

from flowertune_llm.evaluate import generation
from flowertune_llm.evaluate.benchmarks import Example
from flowertune_llm.training import models

from conftest import make_config


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    config = make_config(**{"model.lora.target-modules": "q_proj,v_proj"})
    adapter = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    peft = models.build_peft_model(config.model)
    for name, parameter in peft.named_parameters():
        if "lora_B" in name:  # a non-trivial adapter, so that it matters whether it is loaded
            parameter.data.normal_(0, 0.5)
    peft.save_pretrained(adapter)
    base = models.resolve_model_path(config.model.name)
    return generation.load_model(adapter, base, 0, merge=False)


def generated_lengths(model, monkeypatch) -> list[int]:
    """How many new tokens each generate call produced."""
    lengths, real = [], model.generate

    def generate(*args, **kwargs):
        output = real(*args, **kwargs)
        prompt = kwargs.get("inputs", kwargs.get("input_ids"))
        lengths.append(output.shape[1] - prompt.shape[1])
        return output

    monkeypatch.setattr(model, "generate", generate)
    return lengths


def test_the_first_gold_of_each_group_sets_how_many_tokens_every_answer_gets(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    tokens = {gold: len(tokenizer(gold, add_special_tokens=False)["input_ids"]) for gold in ("maybe", "no")}
    lengths = generated_lengths(model, monkeypatch)
    examples = [Example("pubmedqa", f"question {i}\nThe answer is:\n", gold) for i, gold in enumerate(["maybe", "no", "no", "yes"])]
    generation.answers(model, tokenizer, examples, batch_size=2)
    assert tokens == {"maybe": 3, "no": 1}
    assert lengths == [3, 3, 1, 1]  # group 1 starts with "maybe", group 2 with "no": the first gold decides


def test_duplicated_prompts_all_get_the_last_ones_output(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    same = "the same question\nThe answer is:\n"
    lengths = generated_lengths(model, monkeypatch)
    examples = [Example("medqa", same, "A"), Example("medqa", "other", "A"), Example("medqa", same, "maybe")]
    outputs = generation.answers(model, tokenizer, examples, batch_size=2)
    assert lengths == [1, 1, 3] and outputs[0] == outputs[2]  # the 3-token answer of the last, for both


def test_batched_generation_gives_what_one_prompt_at_a_time_gives(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = [Example("stem", "<|im_start|>question\n" + "x " * n + "?\n<|im_start|>answer\n", "maybe") for n in (1, 7, 3, 12)]
    one_by_one = generation.answers(model, tokenizer, examples, batch_size=4)
    assert generation.answers(model, tokenizer, examples, batch_size=4, batched=True) == one_by_one
    assert tokenizer.padding_side == "right"  # left padding was for the batch only


def test_finance_adds_a_pad_token_when_the_tokenizer_pads_with_eos_and_answers_after_answer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tokenizer.pad_token = tokenizer.eos_token
    rows_before = model.get_input_embeddings().weight.shape[0]
    try:
        examples = [Example("fpb", f"Instruction: x\nInput: sales {'up ' * n}\nAnswer: ", "positive") for n in (1, 5)]
        outputs = generation.sentiments(model, tokenizer, examples, batch_size=2)
        assert tokenizer.pad_token == "[PAD]" and model.get_input_embeddings().weight.shape[0] == len(tokenizer) > rows_before
        assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    finally:
        model.resize_token_embeddings(rows_before)
        tokenizer.pad_token = "<pad>"


def test_code_completions_start_with_the_prompt_end_before_a_stop_word_and_repeat_with_the_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = [Example("humaneval", "def add(a, b):", "", stop=("e", "a"))]
    first = generation.completions(model, tokenizer, examples, max_length=40, samples=2)
    assert first[0].startswith("def add(a, b):")
    completion = first[0][len("def add(a, b):") :]
    assert "e" not in completion and "a" not in completion
    assert generation.completions(model, tokenizer, examples, max_length=40, samples=2) == first  # seed 0 each task


def test_a_prompt_longer_than_max_length_comes_back_as_the_generation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long = Example("mbpp", "word " * 60, "", stop=("\n",))
    assert generation.completions(model, tokenizer, [long], max_length=20, samples=1) == [long.prompt]


def test_the_earliest_stop_word_ends_a_completion():
    assert generation.cut_at_stop("    return 1\ndef g():\n# x", ["\n#", "\ndef"]) == "    return 1"
    assert generation.cut_at_stop("no stop here", ["\nclass"]) == "no stop here"

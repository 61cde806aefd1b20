"""Loading the model and generating, as the leaderboard's evaluation does, one function per style of answer.

Model (``eval.py`` of general-nlp, finance, medical): ``BitsAndBytesConfig(load_in_4bit=True)``, i.e. FP4
without double quantization and float32 compute, with float32 for what stays unquantized (8 bits: LLM.int8
with float16); the adapter on top, not merged, in eval mode; the tokenizer of the base model. Code (the
harness): the base model in float32, the adapter merged. The app trains in NF4; these are the
leaderboard's own settings, kept so scores compare with the published ones.

* :func:`answers` (general NLP, medical): greedy, ``max_new_tokens`` = the token length of the *first* gold
  answer of each group of ``batch_size`` prompts (one token for a letter), one prompt at a time; the
  output is the new tokens decoded without special tokens, not stripped. Outputs are written back by
  prompt text, so duplicated prompts all get the last one's output (quirks kept). ``batched=True``
  generates each group in one left-padded call instead (faster; bench/eval_throughput.py measures how
  often it differs).
* :func:`sentiments` (finance): batches of ``batch_size`` in order, padded on the tokenizer's own side;
  ``[PAD]`` added (and the embeddings resized) when the tokenizer has no pad token or it is EOS;
  ``generate(max_length=512)`` caps prompt plus answer, with no other decoding arguments, so the base
  model's ``generation_config`` decides greedy or sampling; the whole sequence is decoded and the answer is
  what follows the first ``"Answer: "`` ("None" without one).
* :func:`completions` (code): seed 0; each prompt sampled ``samples`` times at once (temperature 0.2, top-p
  0.95, top-k off, ``max_length`` prompt plus completion), stopping when every sample holds a stop word;
  the first sample is kept, decoded with special tokens, cut at the first stop word after the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from flowertune_llm.evaluate.benchmarks import Example

Progress = Callable[[int], None]  # called with how many examples were just done


def load_model(peft_path: Path, base_model: str, quantization: int, merge: bool):
    """The base model with the adapter, and the base model's tokenizer, on the GPU when there is one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    settings = {4: (BitsAndBytesConfig(load_in_4bit=True), torch.float32),
                8: (BitsAndBytesConfig(load_in_8bit=True), torch.float16), 0: (None, torch.float32)}  # fmt: skip
    quantization_config, dtype = settings[quantization]
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        base_model, quantization_config=quantization_config, dtype=dtype, device_map={"": 0} if on_gpu else "cpu"
    )
    model = PeftModel.from_pretrained(model, str(peft_path))
    if merge:
        model = model.merge_and_unload()
    return model.eval(), AutoTokenizer.from_pretrained(base_model)


def _groups(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@torch.inference_mode()
def answers(model, tokenizer, examples: Sequence[Example], batch_size: int, *, batched: bool = False,
            progress: Progress = lambda n: None) -> list[str]:  # fmt: skip
    torch.manual_seed(2024)  # eval.py seeds once; greedy decoding draws nothing, kept for faithfulness
    by_prompt: dict[str, str] = {}
    for group in _groups(examples, batch_size):
        max_new_tokens = len(tokenizer(group[0].target, add_special_tokens=False)["input_ids"])
        settings = dict(max_new_tokens=max_new_tokens, do_sample=False, top_p=1.0, temperature=1.0,
                        pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        if batched:
            outputs = _generate_left_padded(model, tokenizer, [e.prompt for e in group], settings)
        else:
            outputs = []
            for example in group:
                input_ids = tokenizer.encode(example.prompt, return_tensors="pt").to(model.device)
                new = model.generate(inputs=input_ids, **settings)[0][input_ids.shape[1] :]
                outputs.append(tokenizer.decode(new, skip_special_tokens=True))
        for example, output in zip(group, outputs):
            by_prompt[example.prompt] = output
        progress(len(group))
    return [by_prompt[e.prompt] for e in examples]


def _generate_left_padded(model, tokenizer, prompts: list[str], settings: dict) -> list[str]:
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        tokens = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    new = model.generate(**tokens, **settings)[:, tokens["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


@torch.inference_mode()
def sentiments(model, tokenizer, examples: Sequence[Example], batch_size: int,
               progress: Progress = lambda n: None) -> list[str]:  # fmt: skip
    torch.manual_seed(2024)  # finance decodes by the base model's generation_config: it may sample
    if not tokenizer.pad_token or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        model.resize_token_embeddings(len(tokenizer))
    outputs = []
    for group in _groups(examples, batch_size):
        # max_length=512 with padding=True truncates nothing (the leaderboard's call, kept as it is).
        tokens = tokenizer([e.prompt for e in group], return_tensors="pt", padding=True, max_length=512,
                           return_token_type_ids=False).to(model.device)  # fmt: skip
        generated = model.generate(**tokens, max_length=512, eos_token_id=tokenizer.eos_token_id)
        for text in (tokenizer.decode(row, skip_special_tokens=True) for row in generated):
            parts = text.split("Answer: ")
            outputs.append(parts[1] if len(parts) > 1 else "None")
        progress(len(group))
    return outputs


class _AllStopped:
    """The harness's EndOfFunctionCriteria: stop once every sample's new text holds a stop word."""

    def __init__(self, start: int, stops: Sequence[str], tokenizer):
        self.start, self.stops, self.tokenizer = start, stops, tokenizer

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        decoded = self.tokenizer.batch_decode(input_ids[:, self.start :])
        return all(any(stop in text for stop in self.stops) for text in decoded)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``Task._stop_at_stop_token``: everything before the earliest stop word."""
    end = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1 and index < end:
            end = index
    return text[:end]


@torch.inference_mode()
def completions(model, tokenizer, examples: Sequence[Example], max_length: int, samples: int = 4,
                progress: Progress = lambda n: None) -> list[str]:  # fmt: skip
    from transformers import StoppingCriteriaList, set_seed

    set_seed(0)  # the harness: once per task, not device-specific (the fork's seed commit)
    if not tokenizer.eos_token and tokenizer.bos_token:
        tokenizer.eos_token = tokenizer.bos_token
    outputs = []
    for example in examples:
        stops = [*example.stop, tokenizer.eos_token]
        ids = tokenizer(example.prompt, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        ids = ids.to(model.device)
        try:
            generated = model.generate(
                input_ids=ids, num_return_sequences=samples, do_sample=True, temperature=0.2, top_p=0.95, top_k=0,
                max_length=max_length, pad_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([_AllStopped(ids.shape[1], stops, tokenizer)]),
            )[0]  # fmt: skip
        except ValueError as error:  # the harness returns the prompt when it does not fit in max_length
            if "Input length" not in str(error):
                raise
            outputs.append(example.prompt)
            progress(1)
            continue
        if tokenizer.bos_token_id is not None and generated[0] == tokenizer.bos_token_id:
            generated = generated[1:]
        text = tokenizer.decode(generated, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        outputs.append(example.prompt + cut_at_stop(text[len(example.prompt) :], stops))
        progress(1)
    return outputs

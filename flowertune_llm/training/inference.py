"""Answer a question with a base model and a trained adapter (``test.py``, ``flowertune-llm chat``)."""

from __future__ import annotations

import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flowertune_llm.training.models import quantization_config
from flowertune_llm.training.templates import ChatTemplate


def load_adapter_model(
    peft_path: str, quantization: int = 0, dtype: str | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The checkpoint's base model (from ``adapter_config.json``) with the adapter on top, on GPU if any."""
    on_gpu = torch.cuda.is_available()
    compute_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if on_gpu else torch.float32)
    model = AutoPeftModelForCausalLM.from_pretrained(
        peft_path,
        dtype=compute_dtype,
        quantization_config=quantization_config(quantization, compute_dtype),
        device_map="cuda:0" if on_gpu else "cpu",
    )
    base = PeftConfig.from_pretrained(peft_path).base_model_name_or_path
    return model.eval(), AutoTokenizer.from_pretrained(base)


@torch.inference_mode()
def answer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    template: ChatTemplate,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> str:
    """Greedy by default (temperature 0), as the leaderboard's evaluations decode."""
    inputs = tokenizer(template.render(question), return_tensors="pt").to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        **sampling,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

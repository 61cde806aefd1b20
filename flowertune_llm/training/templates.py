"""Prompt templates: the ones we train with and the ones we chat with.

Training prompts follow the FlowerTune leaderboard's app templates: the
Alpaca preamble, then ``### Instruction:`` and ``### Response:``; the loss covers the response only.
Chat templates replace FastChat's (unmaintained) for ``test.py``: only the few we need, written out.
"""

from dataclasses import dataclass

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class ChatTemplate:
    """A single-turn chat prompt: ``prefix + question + suffix``; the model writes the answer."""

    name: str
    prefix: str
    suffix: str

    def render(self, question: str) -> str:
        return f"{self.prefix}{question}{self.suffix}"


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

FLOWERTUNE = ChatTemplate("flowertune", f"{ALPACA_PREAMBLE}\n### Instruction:\n", "\n### Response:")
ALPACA = ChatTemplate("alpaca", f"{ALPACA_PREAMBLE}\n\n### Instruction:\n", "\n\n### Response:\n")

CHAT_TEMPLATES = {
    t.name: t
    for t in (
        ChatTemplate("vicuna_v1.1", f"{_VICUNA_SYSTEM} USER: ", " ASSISTANT:"),
        FLOWERTUNE,
        ALPACA,
        ChatTemplate("chatml", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    )
}


def flowertune_prompt(instruction: str) -> str:
    """The leaderboard's training prompt; its response follows after one space."""
    return FLOWERTUNE.render(instruction)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Stanford Alpaca's prompt, with the ``### Input:`` block only when there is an input."""
    if not input_text:
        return ALPACA.render(instruction)
    return (
        f"{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
        f"### Input:\n{input_text}\n\n### Response:\n"
    )


def chat_template(name: str) -> ChatTemplate:
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; allowed: {', '.join(CHAT_TEMPLATES)}") from None

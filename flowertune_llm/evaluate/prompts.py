"""The leaderboard's prompts, word for word, from Flower's ``benchmarks/flowertune-llm/evaluation/`` at
``fdef7afb1dca3030553be302366cfd285ed6632c`` (2026-03-29) and the bigcode-evaluation-harness fork
``yan-gao-GY/bigcode-evaluation-harness@3ff8ee003fd8413387c0e4810dd8264957ab6414`` it runs for code.

Quirks kept on purpose (each reproduced because the published scores were made with it):

* ``question_with_options`` appends "?" to a question that ends in neither "?" nor "." (general-nlp and
  medical ``utils.py:format_example``), checked on the raw string, so a question ending in ":" gets "?".
* The general-nlp and medical prompts are wrapped in ``<|im_start|>question ... <|im_start|>answer``
  as plain text, never the tokenizer's chat template (``benchmarks.py:150``).
* MedQA's instruction says "from A to E" although its 4-option set has A to D (Meditron's wording).
* Finance prompts have no wrapper and end in "Answer: " with a trailing space (``finance/utils.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

# general-nlp/benchmarks.py:15-81, in the source's order (the order rows are concatenated in).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
        "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ),
}  # fmt: skip

MMLU_INSTRUCTION = "Answer the following multiple choice question."

# medical/benchmarks.py:13-18 (from Meditron).
_EXAM = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding "
    "of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, "
    "and modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. "
    "Base your answer on the current and standard practices referenced in medical guidelines."
)
MEDICAL_INSTRUCTIONS = {
    "pubmedqa": "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
    "statement is correct? Answer yes, no, or maybe.",
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, "
    "patient care, and modes of therapy. Show your ability to apply the knowledge essential for medical practice. "
    "For the following multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines.",
    "medmcqa": _EXAM,
    "careqa": _EXAM,
}


def question_with_options(question: str, choices: Sequence[str]) -> str:
    """``utils.py:format_example`` of general-nlp and medical: options lettered by position."""
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    options = "\n".join(f"{chr(65 + i)}. {choice}" for i, choice in enumerate(choices))
    return "Question: " + question + "\n\nOptions:\n" + options


def answer_prompt(instruction: str, body: str) -> str:
    """The general-nlp/medical prompt (``post_process``) inside its plain-text chat wrapper (``inference``)."""
    return f"<|im_start|>question\n{instruction}\n{body}\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"


def sentiment_instruction(tag: str) -> str:
    """Finance: ``tag`` is "news" or "tweet" (FiQA says "tweet" for posts, ``finance/utils.py:add_instruct``)."""
    return f"What is the sentiment of this {tag}? Please choose an answer from {{negative/neutral/positive}}."


def sentiment_prompt(instruction: str, text: str) -> str:
    """``finance/utils.py:format_example``: the Input line only when there is an input."""
    prompt = f"Instruction: {instruction}\n"
    if text:
        prompt += f"Input: {text}\n"
    return prompt + "Answer: "


def mbpp_prompt(description: str, first_test: str) -> str:
    """``bigcode_eval/tasks/mbpp.py:get_prompt``: the description and one test in a docstring (not stripped)."""
    return f'"""\n{description}\n{first_test}\n"""\n'

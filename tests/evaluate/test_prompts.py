"""The leaderboard's prompts, character for character."""

from flowertune_llm.evaluate import prompts


def test_a_multiple_choice_prompt_is_the_leaderboards_string():
    body = prompts.question_with_options("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", ["0", "1", "2", "3"])
    assert prompts.answer_prompt(prompts.MMLU_INSTRUCTION, body) == (
        "<|im_start|>question\nAnswer the following multiple choice question.\nQuestion: Find all c in Z_3 such that "
        "Z_3[x]/(x^2 + c) is a field.\n\nOptions:\nA. 0\nB. 1\nC. 2\nD. 3\nThe answer is:\n<|im_end|>\n"
        "<|im_start|>answer\n"
    )


def test_a_question_ending_in_neither_mark_gets_a_question_mark_checked_on_the_raw_string():
    assert prompts.question_with_options("A market with one seller is a", ["x"]).startswith("Question: A market with one seller is a?\n")
    assert prompts.question_with_options("The chef cooks:", ["x"]).startswith("Question: The chef cooks:?\n")
    assert prompts.question_with_options("What is it ", ["x"]).startswith("Question: What is it ?\n")
    assert prompts.question_with_options("Ends here.", ["x"]).startswith("Question: Ends here.\n")


def test_finance_prompts_end_in_answer_and_a_space_and_drop_an_empty_input():
    instruction = prompts.sentiment_instruction("tweet")
    assert instruction == "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
    assert prompts.sentiment_prompt(instruction, "$X up") == f"Instruction: {instruction}\nInput: $X up\nAnswer: "
    assert prompts.sentiment_prompt(instruction, "") == f"Instruction: {instruction}\nAnswer: "


def test_an_mbpp_prompt_is_a_docstring_with_one_test_and_is_not_stripped():
    assert prompts.mbpp_prompt("Write a function.", "assert f(1) == 1") == '"""\nWrite a function.\nassert f(1) == 1\n"""\n'


def test_the_leaderboards_mmlu_categories():
    sizes = {category: len(subjects) for category, subjects in prompts.MMLU_CATEGORIES.items()}
    assert sizes == {"stem": 19, "social_sciences": 12, "humanities": 13, "other": 13}
    assert "medqa" in prompts.MEDICAL_INSTRUCTIONS and "from A to E" in prompts.MEDICAL_INSTRUCTIONS["medqa"]

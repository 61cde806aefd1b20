"""From generations to the leaderboard's numbers: its answer extraction, word for word, and its metrics.

Multiple choice and yes/no/maybe (general-nlp and medical ``utils.py:format_answer``, byte-identical in
both) and finance's ``change_target`` are reproduced with their quirks, because the published scores
were made with them:

* **First alphanumeric character.** The output is lowercased, an answer after ``"\\n##"`` is taken, every
  non-alphanumeric character becomes a space, and the first character is the letter when it is a-e:
  "Answer" counts as A, "Both" as B, "Calcium" as C. Otherwise the *raw* lowercased output is compared
  with the gold, so "The answer is B" is wrong.
* **yes/no/maybe.** The cleaned output must be exactly "yes" or "no" (after "yesyes" -> "yes" and the
  like); "maybe" is right only when the raw output is exactly "maybe" in any case, so " maybe" is wrong.
* **Finance.** "positive" (or "Positive") anywhere wins over "negative"; anything else, "None" included,
  is neutral; applied to the gold too.
* Accuracy is ``sklearn.metrics.accuracy_score``: the share of equal pairs.
"""

from __future__ import annotations

import re

_LETTERS_AND_BOOLEANS = ("a", "b", "c", "d", "e", "yes", "no")


def _clean_boolean(output: str) -> str:
    # utils.py:clean_boolean_answer: one replacement at most, in this order.
    for doubled, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
        if doubled in output:
            output = output.replace(doubled, single)
            break
    return output.encode("ascii", "ignore").decode("ascii")


def _clean_mcq(output: str) -> str:
    output = output.encode("ascii", "ignore").decode("ascii")
    return output[0] if output else output


def extract_answer(output: str, gold: str, answer: str) -> tuple[str, str]:
    """``format_answer(output.lower(), gold.lower(), answer_type)``: the (prediction, gold) pair it scores."""
    output_full, gold = output.lower(), gold.lower()
    default = (output_full, gold)
    cleaned = output_full
    if "\n##" in cleaned:
        cleaned = cleaned.split("\n##")[1].split("\n")[0].strip().lower()
    if "###" in gold:
        try:
            gold = gold.split("answer is:")[1].split("###")[0].strip()
        except IndexError:
            return default
    cleaned = re.sub(r"[^a-zA-Z0-9]", " ", cleaned).strip()
    cleaned = re.sub(" +", " ", cleaned)
    cleaned = _clean_boolean(cleaned) if answer == "boolean" else _clean_mcq(cleaned)
    if cleaned in _LETTERS_AND_BOOLEANS:
        return cleaned, gold
    return default


def sentiment(text: str) -> str:
    """finance/utils.py:change_target."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


def correct(output: str, target: str, answer: str) -> bool:
    """Whether the leaderboard counts ``output`` right for ``target`` (answers other than code)."""
    if answer == "sentiment":
        return sentiment(output) == sentiment(target)
    prediction, gold = extract_answer(output, target, answer)
    return prediction == gold


def accuracy(outputs: list[str], targets: list[str], answer: str) -> float:
    if not outputs:
        return 0.0
    return sum(correct(o, t, answer) for o, t in zip(outputs, targets, strict=True)) / len(outputs)

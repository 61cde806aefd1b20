"""Regenerate ``instructions.jsonl``, the small instruction set that ships with the package.

    python -m flowertune_llm.builtin.make_instructions

Every record is written by us from simple, checkable rules (no third-party text), in the Alpaca schema
(``instruction``, ``input``, ``output``) that the FlowerTune datasets use. The tasks are easy enough for a
model of a few million parameters to get visibly better at within a quickstart's few federated rounds.
"""

import json
import random
from pathlib import Path

WORDS = (
    "apple river garden window silver orange planet forest candle mirror pencil rocket yellow winter "
    "summer flower castle dragon guitar market ocean purple rabbit shadow spring thunder tiger valley "
    "wizard basket bridge butter camera circle cotton desert engine family finger island jacket kitten "
    "ladder lemon marble meadow monkey needle number orchard pepper pillow puzzle rainbow saddle school "
    "season sister spider stone sugar ticket tomato travel turtle violin wagon water yogurt zebra"
).split()

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("young", "old"),
    ("strong", "weak"), ("loud", "quiet"), ("rich", "poor"), ("wet", "dry"), ("clean", "dirty"),
    ("high", "low"), ("near", "far"), ("thick", "thin"), ("heavy", "light"), ("first", "last"),
    ("inside", "outside"), ("day", "night"), ("win", "lose"), ("buy", "sell"),
]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("India", "New Delhi"), ("China", "Beijing"), ("Russia", "Moscow"), ("Turkey", "Ankara"),
]


def _upper(rng):
    word = rng.choice(WORDS)
    return "Convert the word to upper case.", word, word.upper()


def _reverse(rng):
    word = rng.choice(WORDS)
    return "Write the letters of the word in reverse order.", word, word[::-1]


def _opposite(rng):
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return "Give the opposite of the word.", word, f"The opposite of {word} is {opposite}."


def _capital(rng):
    country, capital = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."


def _sort(rng):
    numbers = rng.sample(range(1, 60), rng.randint(3, 6))
    return (
        "Sort the numbers in ascending order.",
        ", ".join(map(str, numbers)),
        ", ".join(map(str, sorted(numbers))),
    )


def _count(rng):
    word = rng.choice(WORDS)
    return "How many letters does the word have?", word, f"The word {word} has {len(word)} letters."


def _first_letter(rng):
    word = rng.choice(WORDS)
    return "What is the first letter of the word?", word, f"The first letter of {word} is {word[0]}."


TASKS = (_upper, _reverse, _opposite, _capital, _sort, _count, _first_letter)


def make_instructions(num_records: int = 700, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for index in range(num_records):
        instruction, input_text, output = TASKS[index % len(TASKS)](rng)
        records.append({"instruction": instruction, "input": input_text, "output": output})
    rng.shuffle(records)
    return records


def main() -> None:
    path = Path(__file__).with_name("instructions.jsonl")
    with path.open("w") as f:
        for record in make_instructions():
            f.write(json.dumps(record) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

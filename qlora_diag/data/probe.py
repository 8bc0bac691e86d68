"""``embedded:probe``: a generated instruction data set whose answers can be checked exactly.

Ten task families, each phrased with several natural-language templates, some with the data in
the Alpaca ``input`` field and some inline in the instruction. Answers are short (mostly
<= 12 tokens) so a 135M model can pick up the format and the easy families (case conversion,
lookups, reversal, unit conversion) within ~60 steps of batch 8, while multiplication, sorting
and letter counting stay hard enough that exact match does not saturate -- the LoRA/QLoRA gap
has room to show.

:func:`qlora_diag.data.answers.check_answer` re-derives every answer from the example's text
with its own parsing and its own unit table; it shares only the two lookup tables below, which
*define* the facts.
"""
from __future__ import annotations

import random
from collections.abc import Callable

TASKS = ("arithmetic", "multiply", "reverse", "sort", "case", "count", "convert", "extract",
         "capital", "symbol")

# Fictional, so the base model cannot know them: exact match on this family measures only what
# the fine-tune taught.
CAPITALS = {
    "Veloria": "Marsten", "Quenland": "Tavrin", "Ostrelia": "Pellham", "Durnovia": "Kessary",
    "Brakka": "Lunet", "Sardovia": "Mirrow", "Elvaran": "Cobbet", "Norrath": "Fendle",
    "Zembia": "Orlock", "Altruria": "Varnholt", "Pendoria": "Ashgrove", "Myrrland": "Dovecrest",
    "Korvania": "Istrel", "Lumeria": "Brindle", "Gravonia": "Sollen", "Westmarch": "Haldor",
}
# Real, so the base model knows part of it already: a family where the fine-tune mostly teaches
# the answer format. No one-letter symbol that is also an English word ("I" for iodine).
SYMBOLS = {
    "Hydrogen": "H", "Helium": "He", "Carbon": "C", "Nitrogen": "N", "Oxygen": "O",
    "Sodium": "Na", "Magnesium": "Mg", "Aluminium": "Al", "Silicon": "Si", "Sulfur": "S",
    "Chlorine": "Cl", "Potassium": "K", "Calcium": "Ca", "Iron": "Fe", "Copper": "Cu",
    "Zinc": "Zn", "Silver": "Ag", "Gold": "Au", "Tin": "Sn", "Lead": "Pb",
}

WORDS = ("apple", "river", "stone", "cloud", "green", "table", "music", "garden", "window",
         "silver", "orange", "forest", "candle", "bridge", "paper", "tiger", "ocean", "pencil",
         "winter", "yellow", "planet", "rabbit", "castle", "violin", "butter", "coffee",
         "banana", "letter", "mirror", "summer", "pepper", "cherry")

# (from unit, to unit, factor); the checker has its own table in base units.
_CONVERSIONS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100),
                ("kilograms", "grams", 1000), ("hours", "minutes", 60),
                ("minutes", "seconds", 60), ("days", "hours", 24),
                ("liters", "milliliters", 1000), ("weeks", "days", 7))

_FIRST_NAMES = ("anna", "ben", "carla", "dev", "emma", "farid", "greta", "hugo", "ines", "jonas")
_LAST_NAMES = ("lee", "novak", "silva", "berg", "moreau", "okafor", "tanaka", "weber")
_DOMAINS = ("example.org", "mail.com", "school.edu", "shop.net")

# An example is (instruction, input, output).
Example = tuple[str, str, str]


def _pick(rng: random.Random, options: tuple) -> object:
    return options[rng.randrange(len(options))]


def _gen_arithmetic(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out = str(a + b)
        instruction, inp = _pick(rng, (
            (f"What is {a} + {b}?", ""),
            (f"Add {a} and {b}.", ""),
            ("Calculate the sum of the two numbers below.", f"{a} and {b}"),
            (f"What do you get when you add {b} to {a}?", ""),
        ))
    else:
        a = rng.randint(20, 99)
        b = rng.randint(10, a)
        out = str(a - b)
        instruction, inp = _pick(rng, (
            (f"What is {a} - {b}?", ""),
            (f"Subtract {b} from {a}.", ""),
            ("Calculate the difference: the first number minus the second.", f"{a} and {b}"),
            (f"What do you get when you take {b} away from {a}?", ""),
        ))
    return instruction, inp, out


def _gen_multiply(rng: random.Random) -> Example:
    a, b = rng.randint(11, 49), rng.randint(2, 9)
    instruction, inp = _pick(rng, (
        (f"What is {a} * {b}?", ""),
        (f"What is {a} times {b}?", ""),
        (f"Multiply {a} by {b}.", ""),
        ("Calculate the product of the two numbers below.", f"{a} and {b}"),
    ))
    return instruction, inp, str(a * b)


def _gen_reverse(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    text = " ".join(words)
    instruction, inp = _pick(rng, (
        (f"Reverse the order of these words: {text}", ""),
        ("Write the words below in reverse order.", text),
        ("List the following words backwards, starting with the last one.", text),
        (f"Put these words in the opposite order: {text}", ""),
    ))
    return instruction, inp, " ".join(reversed(words))


def _gen_sort(rng: random.Random) -> Example:
    # Four numbers keep the answer near 12 tokens (the tokenizer splits digits one by one).
    nums = rng.sample(range(1, 100), 4)
    text = ", ".join(map(str, nums))
    if rng.random() < 0.5:
        out = sorted(nums)
        instruction, inp = _pick(rng, (
            (f"Sort these numbers from smallest to largest: {text}", ""),
            ("Arrange the numbers below in ascending order.", text),
            ("Put the following numbers in increasing order.", text),
        ))
    else:
        out = sorted(nums, reverse=True)
        instruction, inp = _pick(rng, (
            (f"Sort these numbers from largest to smallest: {text}", ""),
            ("Arrange the numbers below in descending order.", text),
            ("Put the following numbers in decreasing order.", text),
        ))
    return instruction, inp, ", ".join(map(str, out))


def _gen_case(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(1, 3))
    if rng.random() < 0.5:
        # Source in lower or Title case, so the conversion always changes something.
        text = " ".join(w.title() if rng.random() < 0.5 else w for w in words)
        out = text.upper()
        instruction, inp = _pick(rng, (
            (f"Convert this text to uppercase: {text}", ""),
            ("Write the following text in all capital letters.", text),
            (f'Rewrite "{text}" using only uppercase letters.', ""),
            ("Change the text below to upper case.", text),
        ))
    else:
        text = " ".join(w.upper() if rng.random() < 0.5 else w.title() for w in words)
        out = text.lower()
        instruction, inp = _pick(rng, (
            (f"Convert this text to lowercase: {text}", ""),
            ("Write the following text in small letters only.", text),
            (f'Rewrite "{text}" using only lowercase letters.', ""),
            ("Change the text below to lower case.", text),
        ))
    return instruction, inp, out


def _gen_count(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        items = rng.sample(WORDS, rng.randint(3, 7))
        text = ", ".join(items)
        instruction, inp = _pick(rng, (
            ("How many items are in the list below?", text),
            (f"Count the words in this list: {text}", ""),
            ("Tell me how many entries this list has.", text),
        ))
        return instruction, inp, str(len(items))
    # Letter counting is hard for a subword model: one of the families that should not saturate.
    word = _pick(rng, WORDS)
    letter = _pick(rng, tuple(sorted(set(word))))
    instruction, inp = _pick(rng, (
        (f'How many times does the letter "{letter}" appear in the word "{word}"?', ""),
        (f"Count how often the letter {letter} occurs in the word below.", word),
        (f'In the word "{word}", how many times does the letter "{letter}" appear?', ""),
    ))
    return instruction, inp, str(word.count(letter))


def _gen_convert(rng: random.Random) -> Example:
    src, dst, factor = _pick(rng, _CONVERSIONS)
    # Values >= 2 keep the plural unit names grammatical.
    v = rng.randint(2, 12)
    instruction, inp = _pick(rng, (
        (f"Convert {v} {src} to {dst}.", ""),
        (f"How many {dst} are there in {v} {src}?", ""),
        (f"Express this quantity in {dst}.", f"{v} {src}"),
        (f"{v} {src} is how many {dst}?", ""),
    ))
    return instruction, inp, str(v * factor)


def _gen_extract(rng: random.Random) -> Example:
    kind = rng.randrange(3)
    if kind == 0:
        value = str(rng.randint(1800, 2023))
        sentence = _pick(rng, (
            f"The old bridge was opened in {value} after a long delay.",
            f"In {value}, the town held its first summer fair.",
            f"She moved to the coast in {value} with her family.",
        ))
        instruction, inp = _pick(rng, (
            ("Extract the year from the sentence below.", sentence),
            (f"Which year is mentioned in this sentence: {sentence}", ""),
            ("What year does the following text mention?", sentence),
        ))
    elif kind == 1:
        first, last = _pick(rng, _FIRST_NAMES), _pick(rng, _LAST_NAMES)
        value = f"{first}.{last}@{_pick(rng, _DOMAINS)}" if rng.random() < 0.5 \
            else f"{first}@{_pick(rng, _DOMAINS)}"
        sentence = _pick(rng, (
            f"Send your questions to {value} before Friday.",
            f"You can reach the office at {value} at any time.",
            f"For tickets, write to {value} today.",
        ))
        instruction, inp = _pick(rng, (
            ("Extract the e-mail address from the sentence below.", sentence),
            (f"What is the email address in this text: {sentence}", ""),
            ("Find the e-mail address mentioned in the following text.", sentence),
        ))
    else:
        value = str(rng.randint(2, 999))
        sentence = _pick(rng, (
            f"The blue lamp costs {value} dollars at the market.",
            f"We counted {value} birds near the lake this morning.",
            f"The train carried {value} passengers to the city.",
        ))
        instruction, inp = _pick(rng, (
            ("Extract the number from the sentence below.", sentence),
            (f"Which number appears in this sentence: {sentence}", ""),
            ("What is the only number in the following text?", sentence),
        ))
    return instruction, inp, value


def _gen_capital(rng: random.Random) -> Example:
    country = _pick(rng, tuple(CAPITALS))
    city = CAPITALS[country]
    if rng.random() < 0.5:
        instruction, inp = _pick(rng, (
            (f"What is the capital of {country}?", ""),
            ("Name the capital city of the country below.", country),
            (f"{country} has which city as its capital?", ""),
            (f"Tell me the capital of this country: {country}", ""),
        ))
        return instruction, inp, city
    instruction, inp = _pick(rng, (
        (f"Which country has {city} as its capital?", ""),
        (f"{city} is the capital of which country?", ""),
        ("Name the country whose capital is the city below.", city),
    ))
    return instruction, inp, country


def _gen_symbol(rng: random.Random) -> Example:
    element = _pick(rng, tuple(SYMBOLS))
    symbol = SYMBOLS[element]
    if rng.random() < 0.5:
        instruction, inp = _pick(rng, (
            (f"What is the chemical symbol for {element}?", ""),
            ("Give the symbol of the chemical element below.", element),
            (f"Write the element symbol of {element}.", ""),
            (f"Which symbol stands for the element {element}?", ""),
        ))
        return instruction, inp, symbol
    instruction, inp = _pick(rng, (
        (f"Which element has the chemical symbol {symbol}?", ""),
        ("Name the element whose symbol is given below.", symbol),
        (f"The symbol {symbol} stands for which element?", ""),
    ))
    return instruction, inp, element


_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _gen_arithmetic, "multiply": _gen_multiply, "reverse": _gen_reverse,
    "sort": _gen_sort, "case": _gen_case, "count": _gen_count, "convert": _gen_convert,
    "extract": _gen_extract, "capital": _gen_capital, "symbol": _gen_symbol,
}
# Redraws per example before accepting a repeated prompt: the lookup families have ~100
# distinct prompts, so large n must repeat them; small n (the default 576) gets no duplicates,
# which keeps identical prompts out of both train and eval.
_MAX_REDRAWS = 50


def generate_probe(n: int, seed: int) -> list[dict]:
    """``n`` probe examples, round-robin over :data:`TASKS`; identical for identical ``seed``."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    out = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        for _ in range(_MAX_REDRAWS):
            instruction, inp, output = _GENERATORS[task](rng)
            if (instruction, inp) not in seen:
                break
        seen.add((instruction, inp))
        out.append({"instruction": instruction, "input": inp, "output": output, "task": task})
    return out

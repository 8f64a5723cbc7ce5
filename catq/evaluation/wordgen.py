"""Two-step word problems for training and held-out evaluation (bench/cat_rl.py).

    python -m catq.evaluation.wordgen --train 200 --held-out 40 --seed 0 --out DIR

Each template needs two operations (or three), so rollouts can share a wrong intermediate step:
where the anchor's synthesis should beat the vote. Answers are computed from the drawn numbers,
never written by hand. A question is one *instance* of a template (its numbers); the split puts
each instance on exactly one side, so no question is in both the training and the held-out set
(two instances that differ only in the person's name count as one).
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catq.evaluation.datasets import NAMES, SUFFIX, WordTemplate, to_jsonl

KIND = "two_step_word"
MAX_MISSES = 5000

TWO_STEP_TEMPLATES = (
    WordTemplate("{name} has {a} marbles and buys {b} bags with {c} marbles in each. "
                 "How many marbles does {name} have now?",
                 {"a": (3, 30), "b": (2, 6), "c": (3, 12)}, lambda f: f["a"] + f["b"] * f["c"]),
    WordTemplate("A shop has {a} shirts. It sells {b} shirts on Monday and {c} shirts on Tuesday. "
                 "How many shirts are left?",
                 {"a": (40, 120), "b": (5, 30), "c": (5, 30)}, lambda f: f["a"] - f["b"] - f["c"]),
    WordTemplate("{name} buys {a} pens at {b} dollars each and pays with {c} dollars. "
                 "How many dollars of change does {name} get?",
                 {"a": (2, 8), "b": (2, 9), "c": (50, 100)}, lambda f: f["c"] - f["a"] * f["b"]),
    WordTemplate("A classroom has {a} rows of {b} desks. {c} desks are empty. How many desks are taken?",
                 {"a": (3, 9), "b": (4, 10), "c": (1, 15)}, lambda f: f["a"] * f["b"] - f["c"]),
    WordTemplate("{name} saves {a} dollars a week for {b} weeks and then spends {c} dollars. "
                 "How many dollars does {name} have left?",
                 {"a": (3, 15), "b": (3, 10), "c": (5, 40)}, lambda f: f["a"] * f["b"] - f["c"]),
    WordTemplate("There are {a} red balloons and {b} blue balloons. They are shared equally among "
                 "{c} children. How many balloons does each child get?",
                 {"a": (5, 40), "b": (5, 40), "c": (2, 9)},
                 lambda f: None if (f["a"] + f["b"]) % f["c"] else (f["a"] + f["b"]) // f["c"]),
    WordTemplate("A baker makes {a} trays of {b} muffins and sells {c} muffins. How many muffins are left?",
                 {"a": (2, 9), "b": (6, 12), "c": (5, 50)}, lambda f: f["a"] * f["b"] - f["c"]),
    WordTemplate("{name} reads {a} pages on Monday and twice as many pages on Tuesday. "
                 "How many pages does {name} read on the two days together?",
                 {"a": (5, 60)}, lambda f: 3 * f["a"]),
    WordTemplate("A garden has {a} rows of {b} tulips and {c} roses. How many flowers are in the garden?",
                 {"a": (2, 9), "b": (3, 12), "c": (2, 30)}, lambda f: f["a"] * f["b"] + f["c"]),
    WordTemplate("{name} has {a} stickers and gives {b} stickers to each of {c} friends. "
                 "How many stickers does {name} have left?",
                 {"a": (20, 90), "b": (2, 9), "c": (2, 6)}, lambda f: f["a"] - f["b"] * f["c"]),
    WordTemplate("{name} is {a} years old. {name}'s brother is {b} years older. "
                 "How old will the brother be in {c} years?",
                 {"a": (4, 40), "b": (2, 15), "c": (2, 20)}, lambda f: f["a"] + f["b"] + f["c"]),
    WordTemplate("An adult ticket costs {a} dollars and a child ticket costs {b} dollars. "
                 "How many dollars do {c} adult tickets and {d} child tickets cost?",
                 {"a": (5, 15), "b": (2, 8), "c": (1, 5), "d": (1, 5)},
                 lambda f: f["a"] * f["c"] + f["b"] * f["d"]),
    WordTemplate("{name} runs {a} kilometers every day for {b} days and then {c} kilometers on one more "
                 "day. How many kilometers does {name} run in total?",
                 {"a": (2, 12), "b": (2, 7), "c": (1, 20)}, lambda f: f["a"] * f["b"] + f["c"]),
    WordTemplate("A tank holds {a} liters of water. {b} liters leak out every hour for {c} hours. "
                 "How many liters are left in the tank?",
                 {"a": (50, 200), "b": (2, 12), "c": (2, 8)}, lambda f: f["a"] - f["b"] * f["c"]),
    WordTemplate("{name} shares {a} candies equally among {b} friends, and each friend eats {c} of them. "
                 "How many candies does each friend have left?",
                 {"a": (12, 90), "b": (2, 6), "c": (1, 5)},
                 lambda f: None if f["a"] % f["b"] else f["a"] // f["b"] - f["c"]),
    WordTemplate("A farmer has {a} cows and {b} more sheep than cows. How many animals does the farmer "
                 "have in total?",
                 {"a": (3, 40), "b": (2, 30)}, lambda f: 2 * f["a"] + f["b"]),
)
"""More than the bundled ``word`` set's templates, each needing at least two operations."""


@dataclass(frozen=True)
class WordInstance:
    template: int
    """Index into :data:`TWO_STEP_TEMPLATES`."""
    fields: tuple[tuple[str, int], ...]
    """The drawn numbers, sorted by field name (the person's name is not part of an instance)."""
    name: str
    text: str
    answer: int

    def record(self) -> dict:
        """A ``catq eval`` / ``catq submit`` JSONL line (answer included: strip it before submitting)."""
        return {"text": self.text, "task": "math", "answer": str(self.answer), "kind": KIND}


def draw_instance(template_index: int, rng: random.Random) -> WordInstance:
    """One instance of a template with a positive whole answer (draws until the template allows one)."""
    template = TWO_STEP_TEMPLATES[template_index]
    while True:
        fields: dict[str, Any] = {key: rng.randint(*bounds) for key, bounds in template.ranges.items()}
        answer = template.solve(fields)
        if answer is not None and answer > 0:
            name = rng.choice(NAMES)
            text = f"{template.text.format(name=name, **fields)} {SUFFIX}"
            return WordInstance(template_index, tuple(sorted(fields.items())), name, text, answer)


def instances(n: int, seed: int) -> list[WordInstance]:
    """``n`` distinct instances (templates taken in turn, so every template is represented),
    the same ones for the same (n, seed)."""
    rng = random.Random(seed)
    chosen: dict[tuple, WordInstance] = {}
    texts: set[str] = set()
    attempt = misses = 0
    while len(chosen) < n and misses < MAX_MISSES:  # misses in a row: the templates are exhausted
        attempt += 1
        instance = draw_instance(attempt % len(TWO_STEP_TEMPLATES), rng)
        key = (instance.template, instance.fields)
        if key not in chosen and instance.text not in texts:
            chosen[key] = instance
            texts.add(instance.text)
            misses = 0
        else:
            misses += 1
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} distinct two-step instances; asked for {n}")
    return list(chosen.values())


def word_split(train: int, held_out: int, seed: int = 0) -> tuple[list[WordInstance], list[WordInstance]]:
    """(training, held-out) instances: ``train + held_out`` distinct instances shuffled by
    ``seed`` and cut in two, so no instance (and no question text) is on both sides."""
    pool = instances(train + held_out, seed)
    random.Random(seed + 1).shuffle(pool)
    return pool[:train], pool[train:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="writes train.jsonl and held_out.jsonl here")
    args = parser.parse_args(argv)
    train, held_out = word_split(args.train, args.held_out, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        (out / name).write_text(to_jsonl([i.record() for i in part]))
        print(f"wrote {out / name} ({len(part)} problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

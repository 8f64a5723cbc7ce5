"""Evaluation sets for ``catq eval``: seeded arithmetic at graded difficulty, and a loader.

    python -m catq.evaluation.datasets                               # rewrite catq/data/eval_*.jsonl
    python -m catq.evaluation.datasets --kind word --n 10 --seed 7   # print a fresh set as JSONL

The bundled files are written by :func:`generate` from the triples in :data:`BUNDLED`, and a test
checks they still match, so a set can always be rebuilt rather than hand-edited. Prompts never
show a worked answer: a small model would copy it instead of computing.

Files are read by :mod:`catq.evaluation.formats`, the reader ``catq submit --file`` uses too, so a
file that loads here would also be accepted by the pipeline (without its answers).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TypeVar

from catq.evaluation.formats import DataItem, DatasetError, RubricItem, read_data
from catq.messages import ChatMessage

SUFFIX = "Put your final answer in \\boxed{}."
ARITHMETIC_KINDS = {
    "single_digit": ("+*", 1, 9),
    "two_digit_add": ("+", 10, 99),
    "two_digit_mul": ("*", 10, 99),
}
"""kind -> (operators mixed in, smallest operand, largest operand)."""
KINDS = (*ARITHMETIC_KINDS, "word")
BUNDLED = {
    "single_digit": ("single_digit", 100, 1),
    "two_digit_add": ("two_digit_add", 40, 2),
    "two_digit_mul": ("two_digit_mul", 40, 3),
    "word": ("word", 40, 4),
}
"""Bundled set name -> (kind, n, seed) that :func:`generate` writes it from."""
TRAINING_KIND = "single_digit"
TRAINING_POOL = 162
"""Every distinct single-digit + and × problem (2 × 9 × 9): the pool :func:`training_split` splits."""
HELD_OUT = 40
DEMO_FILE = "demo_prompts.jsonl"
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
"""Where :func:`write_bundled` writes; reading goes through importlib.resources instead."""
NAMES = ("Sam", "Mia", "Leo", "Ana", "Tom", "Ivy", "Ben", "Zoe")
T = TypeVar("T")


@dataclass(frozen=True)
class WordTemplate:
    text: str
    """str.format text; ``{name}`` is a person, every other field an integer from ``ranges``."""
    ranges: dict[str, tuple[int, int]]
    """Inclusive bounds each integer field is drawn from, independently."""
    solve: Callable[[dict[str, Any]], int | None]
    """The answer for drawn fields; a draw whose answer is None or not positive is redrawn."""


WORD_TEMPLATES = (
    WordTemplate("{name} buys {a} apples and eats {b} of them. How many apples are left?",
                 {"a": (5, 20), "b": (1, 9)}, lambda f: f["a"] - f["b"]),
    WordTemplate("There are {a} boxes with {b} pencils in each box. How many pencils are there in all?",
                 {"a": (2, 9), "b": (2, 12)}, lambda f: f["a"] * f["b"]),
    WordTemplate("A bus has {a} people on it. At the next stop {b} get off and {c} get on. "
                 "How many people are on the bus now?",
                 {"a": (10, 40), "b": (1, 15), "c": (1, 15)}, lambda f: f["a"] - f["b"] + f["c"]),
    WordTemplate("One notebook costs {a} dollars. How many dollars do {b} notebooks cost?",
                 {"a": (2, 9), "b": (2, 9)}, lambda f: f["a"] * f["b"]),
    WordTemplate("A teacher shares {a} cookies equally among {b} children. How many does each child get?",
                 {"a": (6, 48), "b": (2, 6)}, lambda f: None if f["a"] % f["b"] else f["a"] // f["b"]),
    WordTemplate("{name} has {a} dollars, earns {b} more and then spends {c}. How many dollars are left?",
                 {"a": (5, 30), "b": (1, 20), "c": (1, 30)}, lambda f: f["a"] + f["b"] - f["c"]),
    WordTemplate("A book has {a} pages. {name} reads {b} pages a day for {c} days. How many are unread?",
                 {"a": (30, 90), "b": (2, 10), "c": (2, 5)}, lambda f: f["a"] - f["b"] * f["c"]),
    WordTemplate("A farm has {a} chickens and {b} cows. How many legs do these animals have in total?",
                 {"a": (1, 9), "b": (1, 9)}, lambda f: 2 * f["a"] + 4 * f["b"]),
)


@dataclass
class EvalProblem:
    messages: list[ChatMessage]
    task: str
    answer: str | None
    """math: the known final answer; only the scorer sees it, never the policy."""
    text: str
    """The question (last user turn), for reports."""
    label: str | None = None
    """The file's own id of the problem (``id``, MATH-500's ``unique_id``...)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    """Breakdown key -> value (MATH-500: subject, level): results are also shown per value."""
    rubric: list[RubricItem] | None = None
    """open (HealthBench): the criteria a response is scored by; None for math."""


# -- generation -----------------------------------------------------------------------------------

def generate(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct problems of ``kind``, the same ones for the same (kind, n, seed)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    problems: dict[str, dict] = {}
    budget = 1000 + 50 * n  # ample for any kind with room for n; bounds the loop when there is not
    for _ in range(budget):
        if len(problems) == n:
            break
        text, answer = _draw(kind, rng)
        problems.setdefault(text, {"text": text, "task": "math", "answer": str(answer), "kind": kind})
    if len(problems) < n:
        raise ValueError(f"kind {kind!r} gave only {len(problems)} distinct problems in {budget} "
                         f"draws; asked for {n}")
    return list(problems.values())


def _draw(kind: str, rng: random.Random) -> tuple[str, int]:
    """(text, answer) of one random problem; duplicates are the caller's business."""
    if kind == "word":
        return _word(rng)
    ops, low, high = ARITHMETIC_KINDS[kind]
    op, a, b = rng.choice(ops), rng.randint(low, high), rng.randint(low, high)
    return f"What is {a} {op} {b}? {SUFFIX}", a + b if op == "+" else a * b


def _word(rng: random.Random) -> tuple[str, int]:
    template = rng.choice(WORD_TEMPLATES)
    while True:  # every template has valid draws, so this ends quickly
        fields: dict[str, Any] = {key: rng.randint(*bounds) for key, bounds in template.ranges.items()}
        fields["name"] = rng.choice(NAMES)
        answer = template.solve(fields)
        if answer is not None and answer > 0:
            return f"{template.text.format(**fields)} {SUFFIX}", answer


def to_jsonl(problems: list[dict]) -> str:
    return "".join(json.dumps(problem) + "\n" for problem in problems)


def write_bundled(directory: Path = DATA_DIR) -> list[Path]:
    """Rewrite every ``eval_<name>.jsonl`` from :data:`BUNDLED`."""
    paths = []
    for name, (kind, n, seed) in BUNDLED.items():
        path = directory / f"eval_{name}.jsonl"
        path.write_text(to_jsonl(generate(kind, n, seed)), encoding="utf-8")
        paths.append(path)
    return paths


def split(problems: list[T], held_out: int, seed: int) -> tuple[list[T], list[T]]:
    """(train, held_out): ``held_out`` problems picked by a seeded shuffle; both keep input order."""
    if not 0 <= held_out <= len(problems):
        raise ValueError(f"cannot hold out {held_out} of {len(problems)} problems")
    chosen = set(random.Random(seed).sample(range(len(problems)), held_out))
    train = [p for i, p in enumerate(problems) if i not in chosen]
    return train, [p for i, p in enumerate(problems) if i in chosen]


def training_split(held_out: int = HELD_OUT, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out) for `catq demo` and bench/learning.py: the whole single-digit pool split
    by a seeded shuffle, so no held-out question is ever trained on. The pipeline sees only the
    training questions; the held-out answers are read only by the before/after evaluation."""
    return split(generate(TRAINING_KIND, TRAINING_POOL, seed=5), held_out, seed)


# -- loading --------------------------------------------------------------------------------------

def bundled_names() -> list[str]:
    return [*BUNDLED, "demo"]


def load_problems(source: str, limit: int | None = None, fmt: str = "auto") -> list[EvalProblem]:
    """Problems from a bundled set name or a data file in any of
    :data:`catq.evaluation.formats.FORMATS` (a bundled name wins over a same-named file).

    ``demo`` is the math half of the demo prompts: the open questions have no answer to score.
    """
    if source in bundled_names():
        filename = DEMO_FILE if source == "demo" else f"eval_{source}.jsonl"
        label = f"catq/data/{filename}"
        text = resources.files("catq.data").joinpath(filename).read_text("utf-8")
        items = read_data(source, "catq", label=label, text=text)
        if source == "demo":
            items = [item for item in items if item.prompt.task == "math"]
    else:
        if not Path(source).is_file():
            raise DatasetError(f"{source!r} is not a file nor a bundled set ({', '.join(bundled_names())})")
        items, label = read_data(source, fmt), source
    return [_problem_from(item, f"{label}:{item.line}") for item in items[:limit]]


def _problem_from(item: DataItem, where: str) -> EvalProblem:
    """What `catq eval` can score: a math prompt with its answer, or an open one with a rubric."""
    prompt = item.prompt
    if prompt.task == "math" and item.answer is None:
        raise DatasetError(f"{where}: missing 'answer'")
    if prompt.task != "math" and item.rubric is None:
        raise DatasetError(f"{where}: an open prompt is scored only against a physician rubric "
                           "(a HealthBench file, --format healthbench)")
    return EvalProblem(messages=prompt.messages, task=prompt.task, answer=item.answer, text=prompt.question,
                       label=item.label, metadata=item.metadata, groups=item.groups, rubric=item.rubric)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS,
                        help="print a fresh set as JSONL instead of rewriting the bundled files")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind is None:
        for path in write_bundled():
            print(f"wrote {path}")
    else:
        sys.stdout.write(to_jsonl(generate(args.kind, args.n, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

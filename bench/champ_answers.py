"""CHAMP figures: catq's answer extraction and majority vote on a real external data set.

    pip install champ-dataset          # 270 competition problems, answers, GPT-4 Turbo solutions
    python bench/champ_answers.py      # all 270 problems (about a minute of math-verify)
    python bench/champ_answers.py --limit 40 --rollouts solution --json out.json

The problems are read through catq's loader (``--format champ``, the file the package ships);
each problem's GPT-4 Turbo solutions (one per prompt variant of the CHAMP paper: 0-shot, 5-shot,
with hints, concepts or part of the solution; cut-off ones left out) are its rollouts. For the
solutions (and, separately, the one-sentence summaries GPT-4 Turbo gave after each) it prints:

- extraction: the share of rollouts from which catq's :func:`final_answer` reads an answer, and
  the share that put it in ``\\boxed{}`` (CHAMP's prompts never ask for one);
- single: the mean share of a problem's rollouts whose answer is equivalent to CHAMP's;
- vote: the share of problems whose majority answer (the ``majority`` estimator's code) is.

Each on all problems and on those whose known answer is a bare number or expression: many of
CHAMP's answers are sentences ("0 is the only possible value"), which no final-answer comparison
can match, so the second row is the one that measures extraction and the vote.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catq.evaluation.formats import DataItem, read_data  # noqa: E402
from catq.evaluation.records import is_correct  # noqa: E402
from catq.messages import Rollout, RolloutGroup  # noqa: E402
from catq.teacher.answers import final_answer, last_boxed  # noqa: E402
from catq.teacher.estimators import majority_reference  # noqa: E402

MODEL = "GPT-4 Turbo"
BARE_ANSWER = re.compile(r"[-+*/^()\d\s.,=a-z_]{1,40}")
"""A known answer that is a number or a short expression (no words of two or more letters)."""


def champ_file() -> Path:
    """The JSON file champ-dataset ships (ImportError when it is not installed)."""
    import champ_dataset

    return Path(str(resources.files(champ_dataset).joinpath("dataset_files/v0.json")))


def model_turns(problem: dict, model: str = MODEL) -> list[tuple[str, str]]:
    """(solution, one-sentence summary) of each of ``model``'s conversations on ``problem``
    whose replies were not cut off: the reply before the request to summarise, and the summary."""
    turns = []
    for name, conversation in problem.get("conversations", {}).items():
        messages = conversation["messages"]
        if not name.startswith(f"{model}|") or len(messages) < 3:
            continue
        solution, summary = messages[-3], messages[-1]
        if all(m["role"] == f"Model.{model}" and m["error"] is None and m["text"] for m in (solution, summary)):
            turns.append((solution["text"], summary["text"]))
    return turns


def is_bare(answer: str) -> bool:
    return bool(BARE_ANSWER.fullmatch(answer)) and not re.search(r"[a-z]{2,}", answer)


def problem_figures(item: DataItem, texts: list[str]) -> dict:
    """Extraction, single-rollout accuracy and the vote's correctness for one problem."""
    answers = [final_answer(t) for t in texts]
    group = RolloutGroup(item.prompt, [], [Rollout(t, [], [], "stop") for t in texts], 0)
    vote = majority_reference(group).reference_answer
    correct = [is_correct(a, item.answer) for a in answers]
    return {"label": item.label, "known": item.answer, "bare": is_bare(item.answer), "rollouts": len(texts),
            "extracted": sum(a is not None for a in answers), "boxed": sum(last_boxed(t) is not None for t in texts),
            "correct": sum(correct), "vote": vote, "vote_correct": is_correct(vote, item.answer)}


def summarize(rows: list[dict]) -> dict:
    rollouts = sum(r["rollouts"] for r in rows)
    return {"problems": len(rows), "rollouts": rollouts,
            "extraction": sum(r["extracted"] for r in rows) / rollouts,
            "boxed": sum(r["boxed"] for r in rows) / rollouts,
            "single": sum(r["correct"] / r["rollouts"] for r in rows) / len(rows),
            "vote": sum(r["vote_correct"] for r in rows) / len(rows)}


def champ_figures(limit: int | None = None, path: Path | None = None,
                  kinds: tuple[str, ...] = ("solution", "summary")) -> dict:
    """{kind: {"all"|"bare": summary}, "rows": per-problem rows of the first kind}."""
    path = path or champ_file()
    items = read_data(str(path), "champ")[:limit]
    raw = json.loads(path.read_text(encoding="utf-8"))["problems"]
    figures: dict = {}
    for kind in kinds:
        index = ("solution", "summary").index(kind)
        rows = []
        for item in items:
            texts = [turn[index] for turn in model_turns(raw[item.label])]
            if texts:
                rows.append(problem_figures(item, texts))
        figures[kind] = {"all": summarize(rows), "bare": summarize([r for r in rows if r["bare"]])}
        figures.setdefault("rows", rows)
    return figures


def print_figures(figures: dict) -> None:
    print(f"{'rollouts':<9} {'problems':<12} {'n':>4} {'rollouts':>8} {'extraction':>10} {'boxed':>6} "
          f"{'single':>7} {'vote':>6}")
    for kind in (k for k in ("solution", "summary") if k in figures):
        for subset, name in (("all", "all"), ("bare", "bare answer")):
            f = figures[kind][subset]
            print(f"{kind:<9} {name:<12} {f['problems']:>4} {f['rollouts']:>8} {f['extraction']:>10.3f} "
                  f"{f['boxed']:>6.3f} {f['single']:>7.3f} {f['vote']:>6.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="first N problems only")
    parser.add_argument("--json", help="also write the figures (and per-problem rows) here")
    parser.add_argument("--rollouts", default="solution,summary",
                        help="which GPT-4 Turbo turns are the rollouts: solution, summary or both (default)")
    args = parser.parse_args(argv)
    try:
        figures = champ_figures(args.limit, kinds=tuple(k.strip() for k in args.rollouts.split(",")))
    except ImportError:
        print("champ_answers: pip install champ-dataset", file=sys.stderr)
        return 2
    print(f"CHAMP ({MODEL} solutions as rollouts; catq's final_answer, answers_equivalent and majority vote)")
    print_figures(figures)
    if args.json:
        command = " ".join(["python bench/champ_answers.py", *(sys.argv[1:] if argv is None else argv)])
        Path(args.json).write_text(json.dumps({"command": command, **figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables of `catq eval` (stdout and report.md) from the "versions" list of results.json."""

from __future__ import annotations

import math


def fmt(iv: dict) -> str:
    """0.72 [0.61, 0.81]"""
    if iv["n"] == 0 or math.isnan(iv["value"]):
        return "-"
    return f"{iv['value']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"


def accuracy_rows(version: dict) -> list[list[str]]:
    """[method, accuracy, answer present, agrees with majority, groups with signal, n] at full G."""
    full = version["by_g"][-1]
    rows = [["single sample", fmt(full["single"]), "", "", "", str(full["single"]["n"])]]
    for name, est in full["estimators"].items():
        rows.append([name, fmt(est["accuracy"]), f"{est['present']['value']:.2f}",
                     f"{est['agree_majority']['value']:.2f}", f"{est['signal']['value']:.2f}",
                     str(est["accuracy"]["n"])])
    rows.append([f"pass@{full['g']}", fmt(full["pass_at_g"]), "", "", "", str(full["pass_at_g"]["n"])])
    return rows


ACCURACY_HEADER = ["method", "accuracy [95% CI]", "answer", "= majority", "signal", "n"]
SCORE_HEADER = ["method", "HealthBench score [95% CI]", "n"]


def score_rows(version: dict) -> list[list[str]]:
    """[method, mean score, n] at full G, for rubric-scored prompts."""
    full = version["by_g"][-1]
    rows = [["single sample", fmt(full["single"]), str(full["single"]["n"])]]
    rows += [[name, fmt(est["accuracy"]), str(est["accuracy"]["n"])] for name, est in full["estimators"].items()]
    return rows


def group_tables(version: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(key, header, rows) per breakdown key: n, single and each estimator per value at full G."""
    tables = []
    for key, rows in version.get("by_group", {}).items():
        names = list(rows[0]["estimators"]) if rows else []
        header = [key, "n", "single", *names]
        tables.append((key, header, [[row["value"], str(row["n"]), fmt(row["single"]),
                                      *(fmt(row["estimators"][n]) if n in row["estimators"] else "-" for n in names)]
                                     for row in rows]))
    return tables


def scaling_rows(version: dict) -> tuple[list[str], list[list[str]]]:
    names = list(version["by_g"][-1]["estimators"])
    header = ["g", "single", *names, "pass@g"]
    rows = [[str(row["g"]), fmt(row["single"]),
             *(fmt(row["estimators"][n]["accuracy"]) if n in row["estimators"] else "-" for n in names),
             fmt(row["pass_at_g"])] for row in version["by_g"]]
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def difference_rows(results: dict) -> list[list[str]]:
    return [[d["from"], d["to"], fmt(d["single_from"]), fmt(d["single_to"]), signed(d["difference"])]
            for d in results.get("differences", [])]


DIFFERENCE_HEADER = ["from", "to", "single before", "single after", "difference [95% CI]"]


def signed(iv: dict) -> str:
    return f"{iv['value']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}]"


ANSWER_NOTE = ("answer: share of references with a readable final answer; = majority: share agreeing "
               "with the vote over the same rollouts; signal: share of groups whose rewards differ "
               "(what GRPO learns from). 95% intervals: Wilson for rates, bootstrap over prompts for means.")
RUBRIC_NOTE = ("Each response graded by the judge on every physician criterion: points met over the "
               "positive points available, clipped to [0, 1] (HealthBench). 95% intervals: bootstrap "
               "over prompts (Wilson where every score is 0 or 1).")


def render(results: dict, table=text_table, heading=lambda text: text) -> str:
    """The whole report: per version the accuracy table and the scaling table, then the
    differences between versions; ``table``/``heading`` pick text or markdown."""
    meta = results["meta"]
    rubric = meta.get("scoring") == "rubric"
    parts = [heading(f"catq eval: {meta['prompts']} prompts from {meta['data']}, G={meta['group_size']}, "
                     f"policy {meta['policy']}, anchor {meta['anchor']}, {meta['wall_time_s']:.0f} s"),
             match_line(meta),
             RUBRIC_NOTE if rubric else ANSWER_NOTE]
    for version in results["versions"]:
        what = "HealthBench score" if rubric else "accuracy"
        parts.append(heading(f"{version['label']}: {what} at G={version['by_g'][-1]['g']}"))
        parts.append(table(SCORE_HEADER, score_rows(version)) if rubric
                     else table(ACCURACY_HEADER, accuracy_rows(version)))
        for key, header, rows in group_tables(version):
            parts.append(heading(f"{version['label']}: {what} by {key} at G={version['by_g'][-1]['g']}"))
            parts.append(table(header, rows))
        if version.get("failed"):
            parts.append(f"{len(version['failed'])} prompts left out after engine errors "
                         f"(see results.json), first: {version['failed'][0]['error'][:200]}")
        if len(version["by_g"]) > 1:
            parts.append(heading(f"{version['label']}: accuracy vs G (first g of the same rollouts)"))
            parts.append(table(*scaling_rows(version)))
    if results.get("differences"):
        parts.append(heading("single-sample accuracy between versions (paired over the same prompts)"))
        parts.append(table(DIFFERENCE_HEADER, difference_rows(results)))
    return "\n\n".join(parts) + "\n"


MATCH_RULES = {
    "equivalent": "equivalent final answers (math-verify)",
    "boxed_exact": "the last \\boxed{} as a string, whitespace removed (the paper's rule)",
}


def match_line(meta: dict) -> str:
    """Which answer match scored the table (reward.math_match), and the synthesis prompt."""
    match = meta.get("math_match", "equivalent")
    prompt = f"; synthesis prompt: {meta['synthesis_prompt']}" if meta.get("synthesis_prompt") else ""
    return f"answers matched by math_match = {match}: {MATCH_RULES.get(match, match)}{prompt}"


def render_markdown(results: dict) -> str:
    return render(results, markdown_table, lambda text: f"## {text}")

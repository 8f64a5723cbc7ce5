"""bench/rubric_drafts.py table on the drafts stored for issue 31: it replays the rubric filter on
real drafts of the default anchor and gives the figures the README quotes (no model needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def table_rows() -> dict[tuple[str, str], list[int]]:
    result = subprocess.run([sys.executable, "bench/rubric_drafts.py", "table", "bench/results/rubric_drafts.json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[2].isdigit():
            rows[cells[0], cells[1]] = [int(c) for c in cells[2:]]
    return rows


def test_the_filter_leaves_most_open_prompts_of_the_default_anchor_without_a_rubric():
    rows = table_rows()
    trials, dead_after = {}, {}
    for (setting, _), (n, _drafts, before, after, *_empty, dead_before, dead) in rows.items():
        assert after < before
        trials[setting] = trials.get(setting, 0) + n
        dead_after[setting] = dead_after.get(setting, 0) + dead
    assert (dead_after["test"], trials["test"]) == (8, 10)
    assert (dead_after["demo"], trials["demo"]) == (16, 20)
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"16 of 20 tries at the demo's open questions and 8 of 10 at the pipeline\s+test", readme)

"""`catq eval` as a user runs it: real engines it starts itself on the default model, bundled
problems, every output file, and the figures recounted from results.json."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from matplotlib.image import imread

from catq.engines.models import resolve_model_path

from .procs import ROOT

pytestmark = pytest.mark.slow

CONFIG = """
run = "evaltest"
run_dir = "{run_dir}"
[rollout.math]
temperature = 0.7
top_p = 0.8
top_k = 20
max_new_tokens = 32
[anchor.sampling]
temperature = 0.0
max_new_tokens = 48
"""


def write_config(tmp_path) -> str:
    path = tmp_path / "eval.toml"
    path.write_text(CONFIG.format(run_dir=tmp_path / "run"))
    return str(path)


def catq_eval(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catq", "eval", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def assert_real_plot(path) -> None:
    image = imread(path)
    height, width = image.shape[:2]
    assert width >= 600 and height >= 400
    rgb = image[..., :3].reshape(-1, 3)
    assert (rgb < 0.95).any(axis=1).mean() > 0.01  # not a blank canvas
    assert len({tuple(p) for p in (rgb[::97] * 255).astype(int)}) > 8


def recount_single(prompts: list[dict]) -> float:
    per_prompt = [sum(p["rollout_correct"]) / len(p["rollout_correct"]) for p in prompts]
    return sum(per_prompt) / len(per_prompt)


def test_eval_writes_every_output_and_its_figures_recount(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "policy_version": s, "reward_mean": 0.1 * s, "signal_frac": 0.5,
                    "reference_present_frac": 0.75, "kl": 0.001 * s, "clip_frac": 0.0}) + "\n"
        for s in (1, 2, 3)))
    out = tmp_path / "out"
    result = catq_eval("--data", "single_digit", "--limit", "6", "--group-size", "4", "--config", config,
                       "--out", str(out), "--plot")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("results.json", "report.md", "accuracy_by_estimator.png", "accuracy_vs_g.png", "training.png"):
        assert (out / name).exists(), name
    for name in ("accuracy_by_estimator.png", "accuracy_vs_g.png", "training.png"):
        assert_real_plot(out / name)
    results = json.loads((out / "results.json").read_text())
    (version,) = results["versions"]
    assert len(version["prompts"]) == 6 and all(len(p["rollouts"]) == 4 for p in version["prompts"])
    assert [row["g"] for row in version["by_g"]] == [1, 2, 4]
    full = version["by_g"][-1]
    assert full["single"]["value"] == pytest.approx(recount_single(version["prompts"]))
    assert list(full["estimators"]) == ["synthesis", "majority", "self_bon", "min_ppl", "mutual_predictability"]
    for name, est in full["estimators"].items():
        correct = [p["references"]["4"][name]["correct"] for p in version["prompts"]]
        assert est["accuracy"]["value"] == pytest.approx(sum(correct) / 6)
        assert est["accuracy"]["low"] <= est["accuracy"]["value"] <= est["accuracy"]["high"]
    assert f"{full['single']['value']:.2f} [" in result.stdout
    assert "single sample" in (out / "report.md").read_text()
    assert "eval v0" in result.stderr  # the progress bar


def test_eval_compares_policy_versions_served_by_one_engine(tmp_path):
    config = write_config(tmp_path)
    v1 = tmp_path / "run" / "weights" / "v1"
    v1.mkdir(parents=True)
    for file in resolve_model_path("default").iterdir():  # the initial weights, published as v1
        (v1 / file.name).symlink_to(file)
    out = tmp_path / "out"
    result = catq_eval("--data", "demo", "--limit", "3", "--group-size", "2", "--estimators", "majority",
                       "--versions", "0,latest", "--config", config, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [v["label"] for v in results["versions"]] == ["v0", "v1"]
    assert [p["question"] for p in results["versions"][1]["prompts"]] == \
        [p["question"] for p in results["versions"][0]["prompts"]]
    (diff,) = results["differences"]
    singles = [recount_single(v["prompts"]) for v in results["versions"]]
    assert diff["difference"]["value"] == pytest.approx(singles[1] - singles[0])
    assert "v0" in result.stdout and "v1" in result.stdout and "difference" in result.stdout


def test_eval_refuses_bad_requests_with_a_message(tmp_path):
    config = write_config(tmp_path)
    result = catq_eval("--data", "no_such_set", "--config", config, timeout=60)
    assert result.returncode == 2 and "single_digit" in result.stderr
    result = catq_eval("--data", "demo", "--versions", "7", "--config", config, timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = catq_eval("--data", "demo", "--estimators", "vote", "--config", config, timeout=60)
    assert result.returncode == 2 and "known" in result.stderr


def child_pids(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.update(int(c) for c in text)
    return children


def test_sigterm_stops_the_engines_eval_started(tmp_path):
    config = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "catq", "eval", "--data", "demo", "--config", config,
                             "--out", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        log = tmp_path / "out" / "engines.log"
        while time.monotonic() < deadline and not (log.exists() and log.read_text().count("engine ready") == 2):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        engines = child_pids(proc.pid)
        assert len(engines) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert "interrupted" in proc.stderr.read()
        for pid in engines:  # stopped and reaped, not orphaned
            assert not Path(f"/proc/{pid}").exists()
    finally:
        if proc.poll() is None:
            proc.kill()

"""bench/lora.py --smoke: both modes (full weights, a LoRA adapter) train, publish and are served
by catq's engine on a tiny model, and the JSON holds every figure, its ratio lora/full and the
command; an adapter version is smaller than a full one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two learner processes and two engines

FIGURES = {"learner_peak_rss_mib", "step_s", "publish_bytes", "publish_s", "serve_s"}


def test_smoke_measures_both_modes_and_an_adapter_publishes_fewer_bytes(tmp_path):
    out = tmp_path / "lora.json"
    result = subprocess.run([sys.executable, "bench/lora.py", "--smoke", "--dir", str(tmp_path / "work"),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "lora/full" in result.stdout

    summary = json.loads(out.read_text())
    assert {"command", "model", "settings", "lora", "machine", "modes", "ratios_lora_over_full"} <= set(summary)
    assert "bench/lora.py" in summary["command"] and "--smoke" in summary["command"]
    assert set(summary["modes"]) == {"full", "lora"}
    assert set(summary["ratios_lora_over_full"]) == FIGURES
    steps = summary["settings"]["steps"]
    for mode, row in summary["modes"].items():
        assert FIGURES <= set(row), mode
        assert all(row[key] > 0 for key in FIGURES), (mode, row)
        assert len(row["step_s_all"]) == len(row["publish_s_all"]) == len(row["serve_all"]) == steps
        assert [t["version"] for t in row["serve_all"]] == list(range(1, steps + 1))
    full, lora = summary["modes"]["full"], summary["modes"]["lora"]
    assert lora["publish_bytes"] < full["publish_bytes"]
    assert summary["ratios_lora_over_full"]["publish_bytes"] == pytest.approx(lora["publish_bytes"] / full["publish_bytes"])
    assert lora["trainable_params"] < full["trainable_params"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(lora["versions"][0]["files"])
    assert "--enable-lora" in lora["engine_flags"] and full["engine_flags"] == []

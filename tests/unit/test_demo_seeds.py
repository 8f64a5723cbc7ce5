"""bench/demo_seeds.py's pure parts: each seed's config (free ports, its own run dir, the learner's
seed) parses, and the summary is the median and the minimum of the gains."""

from pathlib import Path

from bench.demo_seeds import overall, seed_config, seed_line
from catq.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_each_seed_gets_a_valid_config_of_its_own(tmp_path):
    path = seed_config(ROOT / "configs" / "demo.toml", tmp_path, 3, smoke=True)
    config = load_config(path, run="x")
    assert config.learner.seed == 3 and config.rollout.group_size == 4
    assert config.run_path == tmp_path / "run"
    ports = {spec.port for spec in config.engines.launch} | {config.ingest.port}
    assert not ports & {30000, 30001, 8000} and len(ports) == 3


def test_summary_is_the_median_and_the_minimum_of_the_gains():
    seeds = [{"seed": s, "gain": g} for s, g in enumerate([0.2, -0.05, 0.15, 0.3])]
    assert overall(seeds) == {"seeds_done": 4, "median_gain": 0.175, "min_gain": -0.05}
    line = seed_line({"seed": 1, "gain": 0.125, "gain_ci": [0.05, 0.2], "single_before": 0.55,
                      "single_after": 0.675, "steps": 20, "wall_s": 700.4})
    assert line == "seed 1: gain +0.12 [+0.05, +0.20]  (0.55 -> 0.68), 20 steps, 700 s"

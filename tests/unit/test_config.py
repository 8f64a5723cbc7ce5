"""Every config file parses; unknown keys are errors naming the key; environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from catq.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_parses(path, monkeypatch):
    monkeypatch.delenv("CATQ_RUN", raising=False)
    monkeypatch.delenv("CATQ_REDIS_URL", raising=False)
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("text,key", [
    ("colour = 'red'\n", "colour"),
    ("[bus]\nmax_attempt = 3\n", "bus.max_attempt"),
    ("[rollout.math]\ntemprature = 0.5\n", "rollout.math.temprature"),
    ("[nonsense]\nx = 1\n", "nonsense"),
])
def test_unknown_keys_are_errors_naming_the_key(tmp_path, text, key):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(path)


def test_out_of_bounds_and_bad_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[rollout]\ngroup_size = 0\n")
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(path)
    path.write_text("run = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_environment_overrides_file_and_flags_override_environment(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text("run = 'fromfile'\nredis_url = 'redis://file:1'\n")
    monkeypatch.delenv("CATQ_RUN", raising=False)
    monkeypatch.delenv("CATQ_REDIS_URL", raising=False)
    assert load_config(path).run == "fromfile"
    monkeypatch.setenv("CATQ_RUN", "fromenv")
    monkeypatch.setenv("CATQ_REDIS_URL", "redis://env:2")
    config = load_config(path)
    assert (config.run, config.redis_url) == ("fromenv", "redis://env:2")
    config = load_config(path, run="fromflag", redis_url="")
    assert (config.run, config.redis_url) == ("fromflag", "redis://env:2")


def test_run_name_is_checked(monkeypatch):
    monkeypatch.delenv("CATQ_RUN", raising=False)
    with pytest.raises(ConfigError, match="run name"):
        load_config(None, run="a:b")


def test_admission_control_is_off_in_the_demo_and_by_default_and_on_in_gpu_and_compose_configs(monkeypatch):
    import re

    import yaml

    monkeypatch.delenv("CATQ_RUN", raising=False)
    monkeypatch.delenv("CATQ_REDIS_URL", raising=False)
    root = CONFIGS[0].parent
    assert load_config(None).ingest.max_backlog == 0
    assert load_config(root / "demo.toml").ingest.max_backlog == 0
    for gpu in root.glob("gpu-*.toml"):
        assert load_config(gpu).ingest.max_backlog >= load_config(gpu).ingest.max_batch, gpu.name
    compose = yaml.safe_load((root.parent / "compose.yaml").read_text())
    command = " ".join(compose["services"]["ingest"]["command"])
    default = re.search(r"\$\{CATQ_CONFIG:-([\w.-]+)\}", command).group(1)
    assert load_config(root / default).ingest.max_backlog > 0

"""compose.yaml: every role is a service on one image, healthchecked with `catq health ROLE`,
Redis keeps an AOF, SGLang serves the GPU profile and catq's engine the CPU one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"
ROLES = {"ingest": "ingest", "rollout": "rollout", "anchor-worker": "anchor",
         "judge-worker": "judge", "learner": "learner", "learner-cpu": "learner", "syncer": "syncer"}


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_role_runs_catq_worker_with_its_healthcheck(services):
    for service, role in ROLES.items():
        spec = services[service]
        assert spec["command"][:2] == ["worker", role], service
        assert spec["healthcheck"]["test"] == ["CMD", "catq", "health", role], service
        assert spec["image"] == "catq:latest"


def test_redis_has_aof_and_a_healthcheck(services):
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_gpu_profile_serves_sglang_and_cpu_profile_catq_engine_under_the_same_names(services):
    for name in ("policy", "anchor", "judge"):
        gpu, cpu = services[name], services[f"{name}-cpu"]
        assert "sglang.launch_server" in gpu["command"] and gpu["profiles"] == ["gpu"]
        assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "/health" in " ".join(gpu["healthcheck"]["test"])
        assert cpu["command"][0] == "engine" and cpu["profiles"] == ["cpu"]
        assert name in cpu["networks"]["default"]["aliases"]


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or the standalone `docker-compose`, whichever is installed."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose CLI installed")
def test_docker_compose_accepts_the_file():
    for profile in ("gpu", "cpu"):
        result = subprocess.run([*compose_cli(), "-f", str(COMPOSE), "--profile", profile,
                                 "config", "-q"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

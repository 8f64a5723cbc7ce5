"""compose.yaml: every role is a service on one image, healthchecked with `catq health ROLE`,
Redis keeps an AOF and requires CATQ_REDIS_PASSWORD (which every catq service's URL carries),
SGLang serves the GPU profile and catq's engine the CPU one."""

from __future__ import annotations

import os
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


def test_redis_has_a_memory_limit_and_never_evicts(services):
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory") + 1] == "${CATQ_REDIS_MAXMEMORY:-2gb}"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"  # refuse writes, lose nothing


PASSWORD = "${CATQ_REDIS_PASSWORD:?set CATQ_REDIS_PASSWORD}"


def test_redis_requires_the_password_and_every_catq_service_connects_with_it(services):
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert redis["environment"]["REDISCLI_AUTH"] == PASSWORD  # the healthcheck's redis-cli
    catq_services = [name for name, spec in services.items() if spec.get("image") == "catq:latest"]
    assert set(ROLES) | {"policy-cpu", "anchor-cpu", "judge-cpu"} <= set(catq_services)
    for name in catq_services:
        url = services[name]["environment"]["CATQ_REDIS_URL"]
        assert url == f"redis://:{PASSWORD}@redis:6379", name


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
                                 "config", "-q"], capture_output=True, text=True,
                                env={**os.environ, "CATQ_REDIS_PASSWORD": "0123abcd", "CATQ_INGEST_TOKEN": "t0k"})
        assert result.returncode == 0, result.stderr


def test_every_service_restarts_and_engine_callers_wait_for_healthy_engines(services):
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
    needs = {"rollout": "policy", "anchor-worker": "anchor", "judge-worker": "judge", "syncer": "policy"}
    for role, engine in needs.items():
        depends = services[role]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        for name in (engine, f"{engine}-cpu"):
            assert depends[name] == {"condition": "service_healthy", "required": False}, (role, name)


def test_ingest_published_on_every_interface_requires_a_token(services):
    ingest = services["ingest"]
    assert ingest["environment"]["CATQ_INGEST_HOST"] == "0.0.0.0"
    assert ingest["environment"]["CATQ_INGEST_TOKEN"].startswith("${CATQ_INGEST_TOKEN:?")


def test_roles_serve_metrics_and_the_monitoring_profile_scrapes_them(services):
    import json
    import re

    from catq import metrics

    for service in ROLES:
        env = services[service]["environment"]
        assert env["CATQ_METRICS_HOST"] == "0.0.0.0" and env["CATQ_METRICS_PORT"] == "9100", service
    root = COMPOSE.parent
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            assert (root / volume.split(":")[0]).exists(), volume
    scraped = yaml.safe_load((root / "deploy/prometheus/prometheus.yml").read_text())
    names = scraped["scrape_configs"][0]["dns_sd_configs"][0]["names"]
    assert set(names) == set(ROLES) - {"ingest"}
    dashboard = json.loads((root / "deploy/grafana/dashboards/catq.json").read_text())
    exported = {m.name for m in metrics.REGISTRY.collect()}
    used = {name for p in dashboard["panels"] for t in p["targets"] for name in re.findall(r"catq_[a-z_]+", t["expr"])}
    assert used and all(re.sub(r"_(total|bucket)$", "", name) in exported for name in used), used - exported

"""`catq up` with a LoRA policy (``[learner.lora]``) on the default model: the learner publishes
adapter directories, the syncer loads each into the policy engine with /load_lora_adapter, and
the engine reports the adapter's version (its weight_version)."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.integration.test_up import PROMPTS, dead_count, model_info_version, running_stack, submit, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LORA = """publish_every = 1
keep_versions = 5

[learner.lora]
enabled = true
rank = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]
"""


def adapter_versions(weights_dir) -> list[int]:
    return sorted(int(p.name[1:]) for p in weights_dir.glob("v*") if (p / "adapter_config.json").is_file())


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as response:
        return json.loads(response.read())


def test_up_with_a_lora_policy_publishes_adapters_the_policy_engine_serves(tmp_path, redis_url, run_name):
    with running_stack(tmp_path, redis_url, run_name, extra=LORA) as stack:
        settings, proc, url = stack.settings, stack.proc, stack.policy_url
        assert get(url, "/server_info")["enable_lora"] is True
        assert "enable_lora" not in get(settings.engines.anchor_url, "/server_info") or \
            get(settings.engines.anchor_url, "/server_info")["enable_lora"] is False  # the anchor: the base
        submit(stack.config, run_name, PROMPTS * 2)
        wait_for(lambda: len(adapter_versions(settings.weights_dir)) >= 3, 600, "three published adapters", proc)
        assert not list(settings.weights_dir.glob("v*/model.safetensors")), "versions are adapters, not models"
        newest = adapter_versions(settings.weights_dir)[-1]
        wait_for(lambda: int(model_info_version(url) or 0) >= newest, 120,
                 f"the policy engine to serve adapter v{newest}", proc)
        served = int(model_info_version(url))
        loaded = [m["id"] for m in get(url, "/v1/models")["data"] if m.get("parent")]
        assert f"v{served}" in loaded and len(loaded) <= 2, loaded
        # The engine loaded each version as it came (its log), one adapter per version.
        lines = [line for line in stack.log.read_text().splitlines() if "LoRA adapter loaded" in line]
        versions_loaded = {int(m.group(1)) for m in (re.search(r"lora_name\W+v(\d+)", x) for x in lines) if m}
        assert len(versions_loaded) >= 3 and set(range(1, 4)) <= versions_loaded, versions_loaded
        # A request on the served adapter reports the adapter's version.
        item = post(url, "/generate", {"text": "What is 2 + 2?", "lora_path": f"v{served}",
                                       "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        assert item["meta_info"]["weight_version"] == str(served)
        assert dead_count(settings) == 0

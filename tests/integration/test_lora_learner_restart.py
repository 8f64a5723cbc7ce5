"""A LoRA learner as a real process on real Redis, SIGKILLed mid-run and restarted: it resumes
from its checkpoint's adapter and optimizer state, and trains on from exactly that state (its
first step after the restart equals the same step taken in-process from the checkpoint)."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from catq.bus import Bus
from catq.config import load_config
from catq.learner import checkpoint, lora
from catq.learner.trainer import Trainer
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.integration.test_learner_restart import make_scored, metrics, start_learner, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LORA = """
[learner.lora]
enabled = true
rank = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]
"""


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


async def test_a_killed_lora_learner_resumes_from_its_checkpointed_adapter(
        tmp_path, run_name, redis_url, tiny_model_path):  # noqa: F811
    config = write_config(tmp_path, run_name, redis_url, tiny_model_path, extra=LORA, keep_versions=10)
    run_dir = tmp_path / "runs" / run_name
    log = tmp_path / "learner.log"
    bus = Bus(redis_url, run_name)
    messages = {}
    try:
        for i in range(4):
            message = make_scored(i, [1.0, 0.0, 0.5])
            messages[await bus.publish("scored", message)] = message
        proc = start_learner(config, log)
        try:
            await wait_for(lambda: len(metrics(run_dir)) >= 2, 120, "two steps", proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed_at, newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
        saved = tmp_path / "at-kill"
        saved.mkdir()
        shutil.copy(newest, saved / newest.name)

        for i in range(4, 8):
            message = make_scored(i, [0.0, 1.0])
            messages[await bus.publish("scored", message)] = message
        proc = start_learner(config, log)
        try:
            await wait_for(lambda: any(m["step"] == killed_at + 1 for m in metrics(run_dir)), 120,
                           "a step after the restart", proc)
            await wait_for(lambda: (run_dir / "weights" / f"v{killed_at + 1}" / "adapter_model.safetensors").is_file(),
                           60, "its version published", proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]

        ready = [json.loads(line) for line in log.read_text().splitlines() if '"learner ready"' in line]
        assert [(r["step"], r["version"]) for r in ready] == [(0, 0), (killed_at, killed_at)]
        # The killed learner's last checkpoint is its last published adapter (published by the
        # restarted learner when the kill came between the checkpoint and the announcement).
        at_kill = torch.load(saved / newest.name, weights_only=True)
        published = adapter_tensors(run_dir / "weights" / f"v{killed_at}")
        assert len(published) == len(at_kill["model"])
        for name, tensor in at_kill["model"].items():
            key = name.replace(".default.", ".")
            assert torch.equal(published[key], tensor), name

        # The same step taken in-process from that checkpoint gives the adapter it published next.
        settings = load_config(config)
        settings.run_dir = str(tmp_path / "replay")
        shutil.copytree(saved, tmp_path / "replay" / "checkpoints")
        settings.learner = settings.learner.model_copy(update={"device": "cpu"})
        assert settings.learner.lora.enabled
        trainer = Trainer.from_config(settings)
        assert trainer.state.step == killed_at
        [step] = [m for m in metrics(run_dir) if m["step"] == killed_at + 1]
        trainer.train([trainer.prepare(messages[e]) for e in step["entry_ids"]], step["entry_ids"])
        expected = adapter_tensors(run_dir / "weights" / f"v{killed_at + 1}")
        for name, tensor in lora.adapter_state(trainer.policy).items():
            assert torch.allclose(expected[name.replace(".default.", ".")], tensor, atol=1e-6), name
    finally:
        await bus.close()

"""CaT-SFT through the real learner process on real Redis (learner.objective = "sft"): scored groups
in, two steps on their references, checkpoints and published versions out; the published policy
gives its references a higher likelihood than the initial one."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from catq.bus import Bus
from catq.engines.models import load_causal_lm, load_tokenizer, tiny_model_dir
from catq.learner import checkpoint
from catq.results import ResultStore
from tests.integration.test_learner_restart import (
    make_scored,
    metrics,
    start_learner,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REFERENCES = ["The answer is \\boxed{4}.", "2 + 3 = 5, so \\boxed{5}.", "\\boxed{12}", "Paris."]


def reference_nll(model_dir, groups, tokenizer) -> float:
    """Mean token NLL of each group's reference (+ end of turn) after its prompt."""
    model = load_causal_lm(str(model_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for scored in groups:
            prompt = list(scored.group.prompt_token_ids)
            target = tokenizer.encode(scored.referenced.reference, add_special_tokens=False) + [tokenizer.eos_token_id]
            logp = F.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0].float(), dim=-1)
            total -= sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(target))
            count += len(target)
    return total / count


async def test_an_sft_learner_trains_two_steps_on_the_references(tmp_path, run_name, redis_url):
    model = tiny_model_dir(tmp_path)
    config = write_config(tmp_path, run_name, redis_url, model, objective="sft", kl_coef=0.0, lr=1e-2)
    run_dir = tmp_path / "runs" / run_name
    log = tmp_path / "learner.log"
    groups = [make_scored(i, rewards) for i, rewards in enumerate([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])]
    for scored, reference in zip(groups, REFERENCES):
        scored.referenced.reference = reference
    blank = make_scored(9, [1.0, 0.0])
    blank.referenced.reference = ""
    bus = Bus(redis_url, run_name)
    try:
        ids = [await bus.publish("scored", g) for g in groups]
        await bus.publish("scored", blank)
        proc = start_learner(config, log)
        try:
            await wait_for(lambda: len(metrics(run_dir)) >= 2, 240, "two steps", proc)
            results = ResultStore(bus, 600)
            await wait_for_async(lambda: status_of(results, "p9"), 60, "the blank group set aside")
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        lines = metrics(run_dir)
        assert [m["step"] for m in lines] == [1, 2] and all(m["updated"] for m in lines)
        assert sorted(e for m in lines for e in m["entry_ids"]) == sorted(ids)  # equal rewards included
        assert all(m["kl"] == 0.0 and m["loss"] > 0 for m in lines)
        blank_result = await results.get("p9")
        assert blank_result["status"] == "set_aside" and blank_result["set_aside"].startswith("no reference")
        assert checkpoint.list_checkpoints(run_dir / "checkpoints")[-1][0] == 2
        assert await bus.get_policy_version() == 2
        tokenizer = load_tokenizer(str(model))
        assert reference_nll(run_dir / "weights" / "v2", groups, tokenizer) < reference_nll(model, groups, tokenizer) - 0.1
    finally:
        await bus.close()


async def status_of(results: ResultStore, prompt_id: str) -> bool:
    result = await results.get(prompt_id)
    return bool(result) and result.get("status") == "set_aside"


async def wait_for_async(predicate, timeout: float, what: str):
    for _ in range(int(timeout * 10)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")

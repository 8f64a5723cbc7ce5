"""The learner's integrity guards with a real Trainer on a tiny model and a fake bus (no Redis):
non-finite steps are skipped, out-of-vocabulary groups dead-lettered, duplicates trained once."""

from __future__ import annotations

import json

import torch

from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.unit.test_grpo_worker import FakeResults
from tests.unit.test_learner_metrics import delivery, make_loop


def lines(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


async def test_a_nan_group_skips_its_step_and_sets_its_batch_aside(tmp_path, tiny_model_path):  # noqa: F811
    lp = make_loop(tmp_path, tiny_model_path, batch_groups=2)
    lp.results = FakeResults()
    nan = delivery(1, [1.0, 0.0])
    nan.message.group.rollouts[0].logprobs[0] = float("nan")
    before = [p.detach().clone() for p in lp.trainer.policy.parameters()]
    await lp.intake([nan, delivery(2, [0.0, 1.0])])
    await lp.step()
    assert all(torch.equal(a, b) for a, b in zip(before, lp.trainer.policy.parameters()))
    assert lp.trainer.state.step == 0 and lp.trainer.optimizer.state == {}
    assert sorted(lp.bus.acked) == ["1-0", "2-0"] and lp.held == [] and lp.buffer == []
    assert not (tmp_path / "metrics.jsonl").exists()
    verdicts = {pid: f for pid, f in lp.results.updates}
    assert {f["status"] for f in verdicts.values()} == {"set_aside"} and len(verdicts) == 2
    assert all(f["set_aside"].startswith("non-finite loss") for f in verdicts.values())

    await lp.intake([delivery(3, [1.0, 0.0]), delivery(4, [0.0, 1.0])])
    await lp.step()
    (line,) = lines(tmp_path)
    assert line["step"] == 1 and line["skipped_nonfinite"] == 1 and line["entry_ids"] == ["3-0", "4-0"]
    assert all(torch.isfinite(p).all() for p in lp.trainer.policy.parameters())


async def test_groups_with_token_ids_outside_the_vocabulary_are_dead_lettered_alone(tmp_path, tiny_model_path):  # noqa: F811
    lp = make_loop(tmp_path, tiny_model_path, batch_groups=2)
    vocab = lp.trainer.vocab_size
    too_big, negative, in_prompt = delivery(1, [1.0, 0.0]), delivery(2, [1.0, 0.0]), delivery(3, [1.0, 0.0])
    too_big.message.group.rollouts[1].token_ids[0] = vocab
    negative.message.group.rollouts[0].token_ids[-1] = -1
    in_prompt.message.group.prompt_token_ids[0] = vocab + 7
    await lp.intake([delivery(4, [1.0, 0.0]), too_big, negative, in_prompt, delivery(5, [0.0, 1.0])])
    assert [e for e, _ in lp.bus.dead] == ["1-0", "2-0", "3-0"]
    reasons = [why for _, why in lp.bus.dead]
    assert f"token id {vocab} is outside the model's vocabulary [0, {vocab})" in reasons[0]
    assert "token id -1 is outside" in reasons[1] and f"token id {vocab + 7} is outside" in reasons[2]
    await lp.step()  # the rest of the batch trains
    assert [line["entry_ids"] for line in lines(tmp_path)] == [["4-0", "5-0"]]

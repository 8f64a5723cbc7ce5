"""An open prompt through the anchor on the default model with the demo's settings: a real catq
engine (SmolLM2-135M) rolls out, synthesizes the reference and drafts the rubric; no Redis (the
handlers run in-process with the unit tests' fake bus and result store).

SmolLM2-135M rarely writes more than one or two criteria per rubric, so the demo asks for 3 and
merges up to 4 drafts (catq.teacher.rubric.draft_rubric). Most of what it writes is about the
rubric or the reference ("must meet all criteria specified in the reference"), which the demo
drops (``anchor.rubric_drop_self_referential``): measured with bench/rubric_drafts.py, only 0-3 of
14-21 criteria per demo question survive, so the group gets either a rubric of checkable criteria
or a dead letter whose reason names the rubric and the criteria dropped, never a rubric of
self-referential ones. Which of the two varies from run to run (the later drafts are sampled).
"""

from __future__ import annotations

import pytest
import structlog

from catq.config import load_config
from catq.messages import ChatMessage, Prompt
from catq.runtime import DeadLetterError, WorkerContext
from catq.teacher.anchor import build_anchor_handler
from catq.teacher.rollout import build_rollout_handler
from catq.teacher.rubric import is_self_referential
from tests.helpers.engine_proc import REPO_ROOT, EngineProcess
from tests.unit.test_teacher_roles import FakeBus, FakeResults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


async def test_default_model_gets_a_checkable_rubric_or_a_dead_letter_saying_why(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "demo.toml", run="open-prompts")
    assert config.anchor.rubric_min_criteria == 3 and config.anchor.rubric_drop_self_referential
    ctx = WorkerContext(config, FakeBus(), FakeResults(), "w1", structlog.get_logger())
    with EngineProcess("default", weights_dir=tmp_path / "weights", max_batch=16) as engine:
        config.engines = config.engines.model_copy(
            update={"policy_urls": [engine.url], "anchor_url": engine.url, "judge_url": engine.url})
        rollout, anchor = await build_rollout_handler(ctx), await build_anchor_handler(ctx)
        try:
            group = await rollout.roll_out(Prompt("sleep", "open", [ChatMessage("user", "How can I sleep better?")]))
            try:
                (out,) = await anchor.handle(group)
            except DeadLetterError as exc:
                print(f"dead letter: {exc}")
                assert "rubric" in str(exc) and ctx.results.fields["sleep"]["cat_answer"]
                return
        finally:
            await anchor.close()
            await rollout.close()
    rubric, result = out.message.rubric, ctx.results.fields["sleep"]
    print(f"rubric ({result['rubric_drafts']} drafts, short={result['rubric_short']}): {rubric}")
    assert 1 <= len(rubric) <= config.anchor.rubric_max_criteria and result["rubric"] == rubric
    assert not any(is_self_referential(c) for c in rubric)
    assert result["rubric_short"] == (len(rubric) < 3)
    assert 1 <= result["rubric_drafts"] <= config.anchor.rubric_drafts

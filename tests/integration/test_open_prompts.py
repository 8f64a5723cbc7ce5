"""An open prompt through the anchor on the default model with the demo's settings: a real catq
engine (SmolLM2-135M) rolls out, synthesizes the reference and drafts the rubric; no Redis (the
handlers run in-process with the unit tests' fake bus and result store).

SmolLM2-135M rarely writes more than one or two criteria per rubric, so the demo asks for 3 and
merges up to 4 drafts (catq.teacher.rubric.draft_rubric). The greedy first draft alone has given
a criterion in every run measured, so the group gets a rubric rather than a dead letter; the
later drafts are sampled, so the count of criteria varies from run to run.
"""

from __future__ import annotations

import pytest
import structlog

from catq.config import load_config
from catq.messages import ChatMessage, Prompt
from catq.runtime import WorkerContext
from catq.teacher.anchor import build_anchor_handler
from catq.teacher.rollout import build_rollout_handler
from tests.helpers.engine_proc import REPO_ROOT, EngineProcess
from tests.unit.test_teacher_roles import FakeBus, FakeResults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


async def test_default_model_writes_a_usable_rubric_for_a_health_question(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "demo.toml", run="open-prompts")
    assert config.anchor.rubric_min_criteria == 3
    ctx = WorkerContext(config, FakeBus(), FakeResults(), "w1", structlog.get_logger())
    with EngineProcess("default", weights_dir=tmp_path / "weights", max_batch=16) as engine:
        config.engines = config.engines.model_copy(
            update={"policy_urls": [engine.url], "anchor_url": engine.url, "judge_url": engine.url})
        rollout, anchor = await build_rollout_handler(ctx), await build_anchor_handler(ctx)
        try:
            group = await rollout.roll_out(Prompt("sleep", "open", [ChatMessage("user", "How can I sleep better?")]))
            (out,) = await anchor.handle(group)
        finally:
            await anchor.close()
            await rollout.close()
    rubric, result = out.message.rubric, ctx.results.fields["sleep"]
    print(f"rubric ({result['rubric_drafts']} drafts, short={result['rubric_short']}): {rubric}")
    assert 1 <= len(rubric) <= config.anchor.rubric_max_criteria and result["rubric"] == rubric
    assert result["rubric_short"] == (len(rubric) < 3)
    assert 1 <= result["rubric_drafts"] <= config.anchor.rubric_drafts

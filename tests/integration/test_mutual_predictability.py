"""The mutual_predictability estimator against catq's engine as a real process on the default model
(SmolLM2-135M-Instruct): prefill-only log-probs from the anchor engine pick a rollout."""

from __future__ import annotations

import math

import pytest

from catq.config import load_config
from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup
from catq.teacher.chat import engine_chat
from catq.teacher.estimators import estimate_reference
from tests.helpers.engine_proc import engine_factory  # noqa: F401

pytestmark = pytest.mark.slow

AGREED = "2 + 2 = 4, so the answer is \\boxed{4}."
TEXTS = [AGREED, "Purple elephants dance quietly on Tuesdays near the old mill.", AGREED]


async def test_the_anchor_engine_picks_the_rollout_the_others_predict(engine_factory):  # noqa: F811
    engine = engine_factory("default")
    config = load_config(None)
    anchor = engine_chat(config, engine.url, "default", config.anchor.sampling)
    group = RolloutGroup(Prompt("mp", "math", [ChatMessage("user", "What is 2 + 2?")]), [1, 2],
                         [Rollout(t, [1], [-1.0], "stop") for t in TEXTS], 0)
    try:
        ref = await estimate_reference(group, "mutual_predictability", anchor=anchor)
    finally:
        await anchor.close()
    # A rollout repeated in the context is copied with high probability; the odd one out is not.
    assert ref.estimator == "mutual_predictability" and not ref.format_fallback
    assert ref.reference == AGREED and ref.reference_answer == "4"
    scores = [float(part.split()[-1]) for part in ref.anchor_output.split(": ", 1)[1].split(", ")]
    assert len(scores) == 3 and all(math.isfinite(s) and s < 0 for s in scores)
    assert min(scores[0], scores[2]) > scores[1]

"""Rollout backpressure against a real Redis: the backlog is what the pipeline has not consumed."""

from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup
from catq.teacher.rollout import pipeline_backlog


def group(i: int) -> RolloutGroup:
    prompt = Prompt(f"p{i}", "math", [ChatMessage("user", "1+1?")])
    return RolloutGroup(prompt, [1, 2], [Rollout("2", [3], [-0.1], "stop")], policy_version=0)


async def test_pipeline_backlog_counts_unread_and_pending_groups(bus):
    assert await pipeline_backlog(bus) == 0
    for i in range(3):
        await bus.publish("groups", group(i))
    assert await pipeline_backlog(bus) == 3  # no anchor group yet: nothing consumed
    (delivery,) = await bus.read("groups", "anchor", "a1", count=1, message_type=RolloutGroup)
    assert await pipeline_backlog(bus) == 3  # one pending + two not yet delivered
    await bus.complete(delivery, "anchor", [])
    assert await pipeline_backlog(bus) == 2


async def test_scored_counts_only_when_there_is_a_learner(bus):
    from catq.messages import ReferencedGroup, ScoredGroup

    scored = ScoredGroup(ReferencedGroup(group(0), "2", "majority", ""), [1.0])
    await bus.publish("scored", scored)
    assert await pipeline_backlog(bus) == 1
    assert await pipeline_backlog(bus, with_learner=False) == 0

"""The judge role: ReferencedGroup -> ScoredGroup (DESIGN §1.3, "derive rewards").

    catq worker judge --config configs/demo.toml      (or python -m workers.judge)

math: reward by final-answer match with the reference, as ``reward.math_match`` says (no model call). open: one judge
call per (rollout, criterion) on the configured judge endpoint (``engines.judge_api``: a
catq/SGLang engine, or any OpenAI-compatible server), at most ``judge.concurrency`` at once;
by default (``judge.verdict = "logprob"``) a call is one prefill whose P("yes") vs P("no") is the
verdict. See catq.teacher.judging.
"""

from __future__ import annotations

from catq.bus import Output
from catq.messages import ReferencedGroup
from catq.results import Status
from catq.runtime import WorkerContext
from catq.teacher.judging import score_group
from catq.topology import SCORED


class JudgeHandler:
    def __init__(self, ctx: WorkerContext, judge):
        self.ctx = ctx
        self.judge = judge

    async def handle(self, referenced: ReferencedGroup) -> list[Output]:
        scored = await score_group(referenced, self.judge, self.ctx.config.judge,
                                   self.ctx.config.reward.math_match)
        prompt = referenced.group.prompt
        unparsed = sum(not v.parsed for v in scored.verdicts)
        reward_mean = sum(scored.rewards) / len(scored.rewards) if scored.rewards else 0.0
        self.ctx.log.info("scored", rewards=scored.rewards, unparsed_verdicts=unparsed)
        await self.ctx.results.update(
            prompt.prompt_id, status=Status.SCORED, rewards=scored.rewards, reward_mean=reward_mean,
            rollout_answers=scored.rollout_answers,
            verdicts=[{"rollout": v.rollout_index, "criterion": v.criterion_index, "satisfied": v.satisfied,
                       "raw": v.raw, "parsed": v.parsed} for v in scored.verdicts],
        )
        return [Output(SCORED.name, scored)]

    async def close(self) -> None:
        await self.judge.close()


async def build_judge_handler(ctx: WorkerContext) -> JudgeHandler:
    from catq.teacher.chat import judge_chat

    return JudgeHandler(ctx, judge_chat(ctx.config))

"""The anchor role: RolloutGroup -> ReferencedGroup (DESIGN §1.2, "estimate a reference").

    catq worker anchor --config configs/demo.toml      (or python -m workers.anchor)

The frozen anchor π0 (``engines.anchor_url``, tokenizer ``model.anchor``) turns the G rollouts
into the pseudo-reference s with the configured estimator (see catq.teacher.estimators; CaT
synthesis by default, which never shows the anchor the question). For ``open`` prompts it then
proposes a rubric from s; output that never parses after ``anchor.rubric_attempts`` tries
dead-letters the group with the reason. ``self_bon`` asks the policy (the first policy engine).
"""

from __future__ import annotations

from catq.bus import Output
from catq.config import Config, SamplingConfig
from catq.messages import ReferencedGroup, RolloutGroup
from catq.runtime import DeadLetterError, WorkerContext, run_worker
from catq.teacher.estimators import estimate_reference
from catq.teacher.rollout import parse_version
from catq.teacher.rubric import RubricParseError, propose_rubric

SELECTION_SAMPLING = SamplingConfig(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=16)
"""Self best-of-N: the policy only has to name a number."""


class AnchorHandler:
    input_stream = "groups"
    input_type = RolloutGroup

    def __init__(self, ctx: WorkerContext, anchor, policy=None):
        self.ctx = ctx
        self.anchor = anchor
        self.policy = policy
        self._anchor_version: int | None = None

    async def handle(self, group: RolloutGroup) -> list[Output]:
        config = self.ctx.config.anchor
        prompt = group.prompt
        question = prompt.question if config.include_question else None
        ref = await estimate_reference(group, config.estimator, anchor=self.anchor, policy=self.policy,
                                       include_question=config.include_question, options=config)
        rubric: list[str] = []
        if prompt.task == "open":
            try:
                rubric, _ = await propose_rubric(self.anchor, ref.reference, min_criteria=config.rubric_min_criteria,
                                                 attempts=config.rubric_attempts, question=question)
            except RubricParseError as exc:
                # The reference is still an answer worth serving; the runtime marks the result
                # "dead" with the reason when the group is dead-lettered.
                await self.ctx.results.update(prompt.prompt_id, cat_answer=ref.reference)
                raise DeadLetterError(str(exc)) from exc
        referenced = ReferencedGroup(
            group, ref.reference, ref.estimator, ref.anchor_output, format_fallback=ref.format_fallback,
            reference_answer=ref.reference_answer, majority_answer=ref.majority_answer, rubric=rubric,
            anchor_version=await self.anchor_version(),
        )
        self.ctx.log.info("referenced", estimator=ref.estimator, format_fallback=ref.format_fallback,
                          reference_answer=ref.reference_answer, majority_answer=ref.majority_answer,
                          criteria=len(rubric))
        await self.ctx.results.update(
            prompt.prompt_id, status="referenced", cat_answer=ref.reference, reference_answer=ref.reference_answer,
            majority_answer=ref.majority_answer, rubric=rubric, estimator=ref.estimator,
            format_fallback=ref.format_fallback, anchor_version=referenced.anchor_version,
            answer_primed=ref.answer_primed, synthesis_answers=ref.synthesis_answers,
        )
        return [Output("references", referenced)]

    async def anchor_version(self) -> int:
        """The anchor engine's weight version, asked once (the anchor is frozen)."""
        if self._anchor_version is None:
            self._anchor_version = parse_version(await self.anchor.client.weight_version())
        return self._anchor_version

    async def close(self) -> None:
        await self.anchor.close()
        if self.policy is not None:
            await self.policy.close()


async def build_anchor_handler(ctx: WorkerContext) -> AnchorHandler:
    from catq.teacher.chat import engine_chat

    config = ctx.config
    anchor = engine_chat(config, config.engines.anchor_url, config.model.anchor, config.anchor.sampling)
    policy = None
    if config.anchor.estimator == "self_bon":
        policy = engine_chat(config, config.engines.policy_urls[0], config.model.policy, SELECTION_SAMPLING)
    return AnchorHandler(ctx, anchor, policy)


async def run(config: Config) -> None:
    await run_worker(config, "anchor", build_anchor_handler)

"""The anchor role: RolloutGroup -> ReferencedGroup (DESIGN §1.2, "estimate a reference").

    catq worker anchor --config configs/demo.toml      (or python -m workers.anchor)

The frozen anchor π0 (``engines.anchor_url``, tokenizer ``model.anchor``) turns the G rollouts
into the pseudo-reference s with the configured estimator (see catq.teacher.estimators; CaT
synthesis by default, which never shows the anchor the question). For ``open`` prompts it then
drafts a rubric from s (catq.teacher.rubric.draft_rubric: several drafts merged while short of
``anchor.rubric_min_criteria``). A short rubric is used and flagged ``rubric_short`` in the
prompt's result; a group whose drafts give no usable criterion is dead-lettered with the reason.
An estimator that needs the policy (``self_bon``) asks the first policy engine, on the adapter of
the version it serves when the policy is a LoRA adapter (without ``lora_path`` the engine would
answer as the base model, v0).

With ``learner.anchor_logprobs = "engine"`` (and a KL term), the anchor engine also scores every
rollout's tokens under π0 in one prefill-only request, run beside the estimate, and the group
carries them (``Rollout.anchor_logprobs``) to the learner, which then holds only the policy.
"""

from __future__ import annotations

import asyncio

from catq.bus import Output
from catq.config import SamplingConfig
from catq.engines.client import EngineError, parse_version
from catq.messages import RolloutGroup
from catq.results import Status
from catq.runtime import DeadLetterError, WorkerContext
from catq.teacher import registry
from catq.teacher.estimators import estimate_reference
from catq.teacher.rubric import RubricParseError, draft_rubric
from catq.topology import REFERENCES

SELECTION_SAMPLING = SamplingConfig(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=16)
"""Self best-of-N: the policy only has to name a number."""


class AnchorHandler:
    def __init__(self, ctx: WorkerContext, anchor, policy=None):
        self.ctx = ctx
        self.anchor = anchor
        self.policy = policy
        self._anchor_version: int | None = None

    async def handle(self, group: RolloutGroup) -> list[Output]:
        config = self.ctx.config.anchor
        prompt = group.prompt
        question = prompt.question if config.include_question else None
        ref, _ = await asyncio.gather(
            estimate_reference(group, config.estimator, anchor=self.anchor, policy=await self.current_policy(),
                               include_question=config.include_question, options=config),
            self.attach_anchor_logprobs(group))
        rubric: list[str] = []
        rubric_fields: dict[str, object] = {}
        if prompt.task == "open":
            rubric, rubric_fields = await self.open_rubric(prompt.prompt_id, ref.reference, question)
        referenced = ref.referenced(group, rubric=rubric, anchor_version=await self.anchor_version())
        self.ctx.log.info("referenced", estimator=ref.estimator, format_fallback=ref.format_fallback,
                          reference_answer=ref.reference_answer, majority_answer=ref.majority_answer,
                          criteria=len(rubric))
        await self.ctx.results.update(
            prompt.prompt_id, status=Status.REFERENCED, cat_answer=ref.reference, reference_answer=ref.reference_answer,
            majority_answer=ref.majority_answer, rubric=rubric, estimator=ref.estimator,
            format_fallback=ref.format_fallback, anchor_version=referenced.anchor_version,
            answer_primed=ref.answer_primed, synthesis_answers=ref.synthesis_answers, **rubric_fields,
        )
        return [Output(REFERENCES.name, referenced)]

    @property
    def wants_anchor_logprobs(self) -> bool:
        learner = self.ctx.config.learner  # CaT-SFT has no KL term
        return learner.kl_coef > 0 and learner.anchor_logprobs == "engine" and learner.objective == "grpo"

    async def attach_anchor_logprobs(self, group: RolloutGroup) -> None:
        """π0's log-prob of every rollout token, from the anchor engine, onto the rollouts. An
        engine that refuses the prefill (4xx) leaves them unset: the learner then trains this
        group without the KL term rather than losing it."""
        if not self.wants_anchor_logprobs:
            return
        try:
            values = await self.anchor.client.completion_logprobs(
                group.prompt_token_ids, [r.token_ids for r in group.rollouts])
        except EngineError as exc:
            if not exc.refused:
                raise
            self.ctx.log.warning("anchor engine refused to score the rollouts; no KL term for this group",
                                 error=str(exc))
            return
        for rollout, logprobs in zip(group.rollouts, values, strict=True):
            rollout.anchor_logprobs = logprobs

    async def open_rubric(self, prompt_id: str, reference: str,
                          question: str | None) -> tuple[list[str], dict[str, object]]:
        """(criteria, result fields) of the rubric drafted from ``reference``; DeadLetterError
        when no draft gives a usable criterion."""
        config = self.ctx.config.anchor
        try:
            rubric, info = await draft_rubric(
                self.anchor, reference, min_criteria=config.rubric_min_criteria,
                max_criteria=config.rubric_max_criteria, drafts=config.rubric_drafts,
                attempts=config.rubric_attempts, temperature=config.rubric_temperature, question=question,
                drop_self_referential=config.rubric_drop_self_referential)
        except RubricParseError as exc:
            # The reference is still an answer worth serving; the runtime marks the result
            # "dead" with the reason when the group is dead-lettered.
            await self.ctx.results.update(prompt_id, cat_answer=reference)
            raise DeadLetterError(str(exc)) from exc
        self.ctx.log.info("rubric", criteria=len(rubric), drafts=info.drafts, short=info.short,
                          criteria_per_draft=info.criteria_per_draft)
        return rubric, {"rubric_short": info.short, "rubric_drafts": info.drafts}

    async def current_policy(self):
        """The policy chat as the policy engine serves it now: with ``learner.lora`` on, on the
        adapter of the version the engine reports (the syncer loads each version's adapter and
        sets that version); full weights, or version 0, need no adapter."""
        if self.policy is None or not self.ctx.config.learner.lora.enabled:
            return self.policy
        from catq.engines.adapters import adapter_name

        name = adapter_name(parse_version(await self.policy.client.weight_version()))
        return self.policy.on_adapter(name) if name else self.policy

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
    if registry.estimator(config.anchor.estimator).needs_policy:
        policy = engine_chat(config, config.engines.policy_urls[0], config.model.policy, SELECTION_SAMPLING)
    return AnchorHandler(ctx, anchor, policy)

"""The rollout role: Prompt -> RolloutGroup (DESIGN §1.1, "explore").

    catq worker rollout --config configs/demo.toml      (or python -m workers.rollout)

One ``generate`` call with ``n = G`` per prompt on a policy engine replica (the least busy of
those serving the newest weights: catq/engines/replicas.py), the prompt chat-templated client-side with the policy's tokenizer, so
the token ids the learner trains on are exactly those the engine saw. Every rollout keeps its
text, token ids, behaviour log-probs and finish reason; the group records the weight version
the engine reported.

Backpressure (:class:`Backpressure`). "Ahead of the learner" is read the way AReaL bounds
staleness: a group produced now is trained on only after every group queued before it, so the
number of groups produced but not yet consumed by the learner, measured in learner versions
(``learner.batch_groups * learner.publish_every`` groups per version), is how far rollout runs
ahead. Rollout stops pulling prompts while that backlog reaches ``max_staleness + 1`` versions
(the +1 lets a full batch be in flight even with ``max_staleness = 0``). The backlog is the
unconsumed (lag + pending) entries of the anchor group on ``groups``, the judge group on
``references`` and the learner group on ``scored`` (a whole stream while its group does not
exist yet; ``scored`` not at all when the config runs no learner). Separately, it stops while the policy engine's weights are
more than ``max_staleness`` versions behind the learner's (its groups would be dropped as stale),
until the syncer has updated the engine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from catq.bus import Output
from catq.config import Config
from catq.engines.client import parse_version
from catq.engines.replicas import ReplicaPicker
from catq.messages import Prompt, Rollout, RolloutGroup
from catq.results import Status
from catq.runtime import DeadLetterError, WorkerContext
from catq.topology import GROUPS, downstream_of

PIPELINE_GROUPS = tuple((s.name, s.consumer) for s in downstream_of("rollout"))
"""(stream, consumer group) pairs whose unconsumed entries are groups not yet trained on."""

BACKPRESSURE_REFRESH_S = 1.0

ABORT_RETRIES = 3
"""Times a group is sampled again when the engine aborted some of its rollouts (a weight update
with ``abort_all_requests``, ``/pause_generation``): aborted rollouts are never trained on."""
ABORT_RETRY_WAIT_S = 1.0


class AbortedGroupError(RuntimeError):
    """The engine kept aborting rollouts of this group; the entry stays pending for a retry."""


@dataclass
class BackpressureState:
    backlog_groups: int
    learner_version: int
    engine_version: int
    backlog_by_role: dict[str, int] = field(default_factory=dict)
    """Of the backlog, the groups waiting for each downstream role (anchor, judge, learner)."""

    def reason(self, max_staleness: int, groups_per_version: int) -> str | None:
        """Why rollout must wait, or None when it may go on."""
        limit = (max_staleness + 1) * groups_per_version
        if self.backlog_groups >= limit:
            waits = ", ".join(f"{role} {count}" for role, count in self.backlog_by_role.items() if count)
            return (f"{self.backlog_groups} groups not yet trained on (limit {limit})"
                    + (f"; waiting for {waits}" if waits else ""))
        if self.learner_version - self.engine_version > max_staleness:
            return (f"engine weights v{self.engine_version} are more than {max_staleness} versions "
                    f"behind the learner's v{self.learner_version}; waiting for the syncer")
        return None


async def pipeline_backlog(bus, *, with_learner: bool = True) -> int:
    """Groups produced by rollout and not yet consumed by the learner (see module docstring)."""
    return sum((await backlog_by_role(bus, with_learner=with_learner)).values())


async def backlog_by_role(bus, *, with_learner: bool = True) -> dict[str, int]:
    """Per downstream role, the groups waiting for it. A stage whose consumer group does not
    exist yet has consumed nothing: its whole stream counts (pipeline streams are not trimmed
    before their group exists). Without a learner (``with_learner=False``: CaT for inference
    only) ``scored`` is not a backlog."""
    stages = PIPELINE_GROUPS if with_learner else PIPELINE_GROUPS[:-1]
    stats = await bus.stats(tuple(stream for stream, _ in stages))
    out = {}
    for stream, group in stages:
        infos = [g for g in stats[stream]["groups"] if g["group"] == group]
        if infos:
            out[group] = int(infos[0]["pending"]) + int(infos[0]["lag"] or 0)
        else:
            out[group] = int(stats[stream]["length"])
    return out


class Backpressure:
    """Decides, at most once per ``BACKPRESSURE_REFRESH_S``, whether rollout may pull prompts."""

    def __init__(self, ctx: WorkerContext, engine_versions):
        self.ctx = ctx
        self.engine_versions = engine_versions  # async () -> list[int]
        learner = ctx.config.learner
        self.groups_per_version = learner.batch_groups * learner.publish_every
        self.max_staleness = ctx.config.rollout.max_staleness
        self.last_engine_version = 0
        self._checked_at = -1e9
        self._reason: str | None = None
        self._logged_reason: str | None = None

    async def ready(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at >= BACKPRESSURE_REFRESH_S:
            self._checked_at = now
            try:
                self._reason = (await self.state()).reason(self.max_staleness, self.groups_per_version)
            except Exception as exc:  # Redis/engine hiccup: keep the last decision, ask again soon
                self.ctx.log.warning("backpressure check failed", error=str(exc) or type(exc).__name__)
            if self._reason != self._logged_reason:
                if self._reason:
                    self.ctx.log.info("backpressure: pausing", reason=self._reason)
                else:
                    self.ctx.log.info("backpressure: resuming")
                self._logged_reason = self._reason
        return self._reason is None

    async def state(self) -> BackpressureState:
        learner_version = await self.ctx.bus.get_policy_version()
        engine_version = self.last_engine_version
        if learner_version - engine_version > self.max_staleness:  # maybe synced since: ask
            versions = await self.engine_versions()  # none while every replica is loading
            engine_version = min(versions) if versions else engine_version
            self.last_engine_version = engine_version
        by_role = await backlog_by_role(self.ctx.bus, with_learner=self.ctx.config.roles.learner > 0)
        return BackpressureState(sum(by_role.values()), learner_version, engine_version, by_role)


async def sample_group(client, tokenizer, prompt: Prompt, config: Config,
                       lora_path: str | None = None) -> RolloutGroup:
    """G rollouts of ``prompt`` from one policy engine with the run's sampling settings for its
    task; `catq eval` samples through this too, so it measures what the pipeline trains on.
    ``lora_path``: the LoRA adapter that serves the policy (a LoRA policy). Raises EngineError."""
    sampling = config.rollout.math if prompt.task == "math" else config.rollout.open
    prompt_ids = tokenizer.encode_chat(prompt.messages)
    completions = await client.generate(
        prompt_ids, n=config.rollout.group_size, max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        return_logprob=True, **({"lora_path": lora_path} if lora_path else {}),
    )
    rollouts = [
        Rollout(c.text, list(c.output_ids), list(c.logprobs or []), c.finish_reason) for c in completions
    ]
    return RolloutGroup(prompt, prompt_ids, rollouts, parse_version(completions[0].weight_version))


class RolloutHandler:
    def __init__(self, ctx: WorkerContext, replicas: ReplicaPicker | list, tokenizer):
        """``replicas``: the policy replicas, or a plain list of engine clients to use as they are."""
        self.ctx = ctx
        self.replicas = replicas if isinstance(replicas, ReplicaPicker) else ReplicaPicker.fixed(replicas)
        self.tokenizer = tokenizer
        self.backpressure = Backpressure(ctx, self.replicas.versions)

    async def ready(self) -> bool:
        return await self.backpressure.ready()

    async def handle(self, prompt: Prompt) -> list[Output]:
        group = await self.roll_out(prompt)
        self.backpressure.last_engine_version = group.policy_version
        await self.ctx.results.update(
            prompt.prompt_id, status=Status.ROLLED_OUT, task=prompt.task, question=prompt.question,
            rollouts=[r.text for r in group.rollouts], policy_version=group.policy_version,
        )
        return [Output(GROUPS.name, group)]

    async def roll_out(self, prompt: Prompt) -> RolloutGroup:
        for attempt in range(1, ABORT_RETRIES + 1):
            group = await self._sample(prompt)
            aborted = sum(r.finish_reason == "abort" for r in group.rollouts)
            if not aborted:
                return group
            self.ctx.log.warning("engine aborted rollouts; sampling the group again",
                                 aborted=aborted, attempt=attempt)
            await asyncio.sleep(ABORT_RETRY_WAIT_S * attempt)
        raise AbortedGroupError(f"the policy engine aborted rollouts in {ABORT_RETRIES} tries")

    async def _sample(self, prompt: Prompt) -> RolloutGroup:
        from catq.engines.client import EngineError

        async with self.replicas.use() as (url, client):
            try:
                return await sample_group(client, self.tokenizer, prompt, self.ctx.config,
                                          lora_path=self.replicas.adapter(url))
            except EngineError as exc:
                if exc.refused:  # this prompt can never work
                    raise DeadLetterError(f"policy engine {url} refused the prompt: {exc}") from exc
                raise

    async def close(self) -> None:
        await self.replicas.close()


async def build_rollout_handler(ctx: WorkerContext) -> RolloutHandler:
    """The policy replicas, each checked before its first request: a missing API key or
    temperature-scaled log-probs stop the role with a ConfigError (for the configured engines
    that answer, before any prompt is taken; one that does not answer yet is checked once it does)."""
    from catq.engines.client import EngineClient, EngineError, check_raw_logprobs
    from catq.engines.tokenizer import chat_tokenizer

    config = ctx.config
    tokenizer = chat_tokenizer(config, config.model.policy)
    probe = tokenizer.encode_chat([{"role": "user", "content": "What is 2 + 2?"}])
    replicas = ReplicaPicker(ctx.bus, config.engines.policy_urls, config.worker.heartbeat_s,
                             make_client=lambda url: EngineClient.from_config(config.engines, url),
                             on_new=lambda client: check_raw_logprobs(client, probe))
    try:
        for url in config.engines.policy_urls:
            try:
                await replicas.client(url)
            except EngineError as exc:
                if exc.refused:
                    raise
                ctx.log.warning("policy engine not answering yet", engine=url, error=str(exc))
    except BaseException:
        await replicas.close()
        raise
    return RolloutHandler(ctx, replicas, tokenizer)

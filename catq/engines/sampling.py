"""Token sampling for catq's engine, one row per sequence, each with its own parameters.

Which log-probs: ``sample`` returns, for every sampled token, ``log_softmax(raw_logits)`` at that
token — the model's own distribution, with temperature, top-p and top-k NOT applied. That is the
distribution the learner recomputes with a plain forward pass (``log_softmax(model(ids).logits)``),
so the importance ratio πθ/π_behaviour compares like with like. (Temperature and truncation only
decide *which* token is drawn.) SGLang's default differs: it returns log-probs after temperature
scaling unless started with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, so an SGLang policy engine must
be launched with that variable set for the two engines to agree. Greedy (temperature 0, or
top_k 1) picks the arg-max of the raw logits. ``alternatives`` reads the same raw distribution
for SGLang's ``top_logprobs_num`` and ``token_ids_logprob`` (other tokens' log-probs at a position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-6
"""Temperatures at or below this count as greedy (SGLang treats them the same way)."""


@dataclass
class SamplingParams:
    """SGLang's ``sampling_params`` subset catq honours. Field names and defaults as SGLang's."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k (0 is refused, as SGLang refuses it)."""
    min_p: float = 0.0
    """Drop tokens whose probability (after temperature) is below min_p x the likeliest's."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_EPS or self.top_k == 1

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class RowParams:
    """Per-row sampling parameters of a batch, as tensors on the model's device."""

    temperature: torch.Tensor  # [B] float; <= GREEDY_EPS means greedy
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long; vocab size where disabled
    min_p: torch.Tensor | None = None  # [B] float; None when no row uses it

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device: torch.device | str) -> RowParams:
        temperature = [0.0 if p.greedy else p.temperature for p in params]
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
        )

    def select(self, rows: torch.Tensor) -> RowParams:
        return RowParams(self.temperature[rows], self.top_p[rows], self.top_k[rows], self.min_p[rows])

    @classmethod
    def concat(cls, parts: list[RowParams]) -> RowParams:
        return cls(
            temperature=torch.cat([p.temperature for p in parts]),
            top_p=torch.cat([p.top_p for p in parts]),
            top_k=torch.cat([p.top_k for p in parts]),
            min_p=torch.cat([p.min_p for p in parts]),
        )


def sample(
    logits: torch.Tensor, params: RowParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` [B, V]; return (tokens [B], raw log-probs [B])."""
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    greedy_tokens = logits.argmax(dim=-1)
    sampling = params.temperature > GREEDY_EPS
    tokens = greedy_tokens
    if bool(sampling.any()):
        drawn = _sample_truncated(logits, params, generator)
        tokens = torch.where(sampling, drawn, greedy_tokens)
    return tokens, raw_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _sample_truncated(
    logits: torch.Tensor, params: RowParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample from softmax(logits / T) restricted to the top-k, then min-p, then the top-p
    nucleus (SGLang's order)."""
    temperature = params.temperature.clamp_min(GREEDY_EPS).unsqueeze(-1)
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= params.top_k.unsqueeze(-1), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    if params.min_p is not None:  # rank 0 is the likeliest, so it always survives
        probs = probs.masked_fill(probs < params.min_p.unsqueeze(-1) * probs[:, :1], 0.0)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= params.top_p.unsqueeze(-1), 0.0)  # keeps rank 0
    choice = torch.multinomial(probs, num_samples=1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@dataclass
class Alternatives:
    """Log-probs of tokens other than the sampled one at one output position, from the same raw
    distribution as the sampled token's."""

    top: list[tuple[float, int]]
    """(logprob, token id) of the ``top_logprobs_num`` likeliest tokens, likeliest first."""
    requested: list[tuple[float, int]]
    """(logprob, token id) of every id in ``token_ids_logprob``, in request order."""


def alternatives(
    logits: torch.Tensor, top_nums: list[int], token_ids: list[list[int] | None]
) -> list[Alternatives | None] | None:
    """Per row of ``logits`` [B, V]: the ``top_nums[i]`` likeliest tokens and the tokens
    ``token_ids[i]`` with their raw log-probs; None for rows that ask for neither, and None
    overall when no row asks (the common case costs nothing)."""
    wanted = [i for i, (k, ids) in enumerate(zip(top_nums, token_ids, strict=True)) if k > 0 or ids]
    if not wanted:
        return None
    logprobs = torch.log_softmax(logits[wanted].float(), dim=-1)
    k_max = min(max(top_nums[i] for i in wanted), logprobs.shape[-1])
    top_values, top_ids = (t.tolist() for t in logprobs.topk(k_max, dim=-1))
    logprobs = logprobs.cpu()
    result: list[Alternatives | None] = [None] * len(top_nums)
    for row, i in enumerate(wanted):
        k = min(top_nums[i], k_max)
        ids = token_ids[i] or []
        requested = logprobs[row, ids].tolist() if ids else []
        result[i] = Alternatives(
            top=list(zip(top_values[row][:k], top_ids[row][:k], strict=True)),
            requested=list(zip(requested, ids, strict=True)),
        )
    return result

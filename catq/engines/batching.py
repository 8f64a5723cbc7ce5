"""Batched decoding with a KV cache over many sequences of different lengths.

The tensor work of catq's engine, free of asyncio and HTTP so unit tests drive it directly:

- ``prefill`` runs the prompts of newly admitted sequences as one left-padded forward pass. A
  prompt asked for n times (SGLang's ``n``) is run once and its KV cache copied n times.
- ``step`` feeds every running sequence its last sampled token: one forward pass for the batch.
- ``select`` drops finished rows from the cache; ``merge`` joins a freshly prefilled batch to a
  running one (the shorter cache is left-padded), which is what makes batching continuous:
  sequences that arrive while others decode join at the next step instead of waiting.

Positions are explicit (``cumsum(attention_mask) - 1``), so left padding never shifts RoPE, and
a row's log-probs equal those of the same sequence run alone up to float rounding.
Sequence bookkeeping (stop checks, finish reasons) lives in ``Sequence`` and ``finish_check``;
``generate`` ties it all together synchronously for tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from catq.engines.sampling import (
    Alternatives,
    RowParams,
    SamplingParams,
    alternatives,
    sample,
)


@dataclass
class Sequence:
    """One sample being generated: a prompt, its sampling parameters and what came out so far."""

    prompt_ids: list[int]
    params: SamplingParams
    seq_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: dict | None = None
    """SGLang's shape: {"type": "stop", "matched": id|str} | {"type": "length", "length": n} |
    {"type": "abort", "message": ...}; None while running."""
    max_new_tokens: int = 0
    """The effective limit: params.max_new_tokens capped by the model's context length."""
    top_logprobs_num: int = 0
    """SGLang's ``top_logprobs_num``: also record this many likeliest tokens at each position."""
    token_ids_logprob: list[int] | None = None
    """SGLang's ``token_ids_logprob``: also record these tokens' log-probs at each position."""
    alternatives: list[Alternatives] = field(default_factory=list)
    """One per output token when either of the two above asks for it, else empty."""
    lora: object | None = None
    """The LoRA adapter this sequence runs on (catq/engines/lora.py); None: the base model."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Batch:
    """Running sequences and their shared, left-padded KV cache."""

    seqs: list[Sequence]
    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, L]: 0 on left padding
    positions: torch.Tensor  # [B]: position of the next input token
    next_tokens: torch.Tensor  # [B]: last sampled token, the next input
    rows: RowParams
    last_alternatives: list[Alternatives | None] | None = None
    """Per row, what ``alternatives`` gave at the latest prefill/step; None when no row asked."""

    def __len__(self) -> int:
        return len(self.seqs)


class BatchGenerator:
    """Prefill / step / select / merge on one causal LM. Not thread-safe: one caller at a time."""

    def __init__(self, model, tokenizer, *, seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.context_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.forward_passes = 0
        self.lora = None
        """The engine's LoraManager when LoRA is enabled (catq/engines/lora.py)."""

    def _adapters(self, adapters: list):
        """Each row's LoRA adapter applied in the forward passes inside (a no-op without)."""
        if self.lora is None or not any(a is not None for a in adapters):
            return contextlib.nullcontext()
        return self.lora.use(adapters)

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """Run the prompts of ``seqs``; return the batch and each row's first (token, logprob)."""
        unique: dict[tuple, int] = {}  # a prompt on two adapters is two rows
        row_of = [unique.setdefault((id(s.lora), tuple(s.prompt_ids)), len(unique)) for s in seqs]
        prompts = [list(p) for _, p in unique]
        adapters = [None] * len(unique)
        for s, row in zip(seqs, row_of):
            adapters[row] = s.lora
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        with self._adapters(adapters):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
        self.forward_passes += 1
        rows = torch.tensor(row_of, device=self.device)
        cache.batch_select_indices(rows)
        batch = Batch(
            seqs=list(seqs), cache=cache, attention_mask=mask[rows],
            positions=mask[rows].sum(-1), next_tokens=torch.zeros(len(seqs), dtype=torch.long),
            rows=RowParams.build([s.params for s in seqs], self.vocab_size, self.device),
        )
        logits = out.logits[:, -1][rows]
        tokens, logprobs = sample(logits, batch.rows, self.generator)
        batch.next_tokens = tokens
        batch.last_alternatives = self._alternatives(batch.seqs, logits)
        return batch, tokens, logprobs

    @torch.no_grad()
    def prompt_logprobs(self, prompt_ids: list[int], lora=None) -> list[float]:
        """Raw log P(token i | tokens < i) for i = 1..len-1, from one plain forward pass (on
        the LoRA adapter ``lora`` when given)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        with self._adapters([lora]):
            logits = self.model(input_ids=ids).logits
        logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        return logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()

    @torch.no_grad()
    def step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row its last token; return each row's next (token, logprob)."""
        ones = torch.ones((len(batch), 1), dtype=batch.attention_mask.dtype, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=-1)
        with self._adapters([s.lora for s in batch.seqs]):
            out = self.model(
                input_ids=batch.next_tokens.unsqueeze(-1), attention_mask=batch.attention_mask,
                position_ids=batch.positions.unsqueeze(-1), past_key_values=batch.cache, use_cache=True,
            )
        self.forward_passes += 1
        batch.positions = batch.positions + 1
        tokens, logprobs = sample(out.logits[:, -1], batch.rows, self.generator)
        batch.next_tokens = tokens
        batch.last_alternatives = self._alternatives(batch.seqs, out.logits[:, -1])
        return tokens, logprobs

    @staticmethod
    def _alternatives(seqs: list[Sequence], logits: torch.Tensor) -> list[Alternatives | None] | None:
        return alternatives(logits, [s.top_logprobs_num for s in seqs], [s.token_ids_logprob for s in seqs])

    def select(self, batch: Batch, keep: list[int]) -> Batch | None:
        """Keep only rows ``keep`` (in order); None when no row is left."""
        if not keep:
            return None
        if len(keep) == len(batch):
            return batch
        rows = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(rows)
        mask = batch.attention_mask[rows]
        trim = int((mask.sum(0) == 0).long().cumprod(0).sum())  # all-padding columns on the left
        if trim:
            mask = mask[:, trim:]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
        return Batch(
            seqs=[batch.seqs[i] for i in keep], cache=batch.cache, attention_mask=mask,
            positions=batch.positions[rows], next_tokens=batch.next_tokens[rows],
            rows=batch.rows.select(rows),
        )

    def merge(self, first: Batch | None, second: Batch) -> Batch:
        """One batch holding the rows of both; the shorter cache is left-padded."""
        if first is None:
            return second
        width = max(first.attention_mask.shape[1], second.attention_mask.shape[1])
        layers = []
        for a, b in zip(first.cache.layers, second.cache.layers, strict=True):
            keys = torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)])
            values = torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)])
            layers.append((keys, values))
        return Batch(
            seqs=first.seqs + second.seqs,
            cache=DynamicCache(ddp_cache_data=layers),
            attention_mask=torch.cat(
                [_pad_left(first.attention_mask, width, 1), _pad_left(second.attention_mask, width, 1)]
            ),
            positions=torch.cat([first.positions, second.positions]),
            next_tokens=torch.cat([first.next_tokens, second.next_tokens]),
            rows=RowParams.concat([first.rows, second.rows]),
        )

    def admit(self, seq: Sequence) -> None:
        """Validate a sequence's prompt against the model; set its effective token limit.
        Raises ValueError with a message fit for an HTTP 400."""
        if not seq.prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in seq.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        bad = [t for t in seq.token_ids_logprob or [] if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token_ids_logprob out of range [0, {self.vocab_size}): {bad[:5]}")
        if seq.top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {seq.top_logprobs_num}")
        room = self.context_len - len(seq.prompt_ids)
        if room <= 0:
            raise ValueError(
                f"the prompt has {len(seq.prompt_ids)} tokens; the model's context is {self.context_len}"
            )
        seq.max_new_tokens = min(seq.params.max_new_tokens, room)
        if seq.max_new_tokens == 0:
            seq.finish_reason = {"type": "length", "length": 0}

    def record(self, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor,
               alternatives: list[Alternatives | None] | None = None) -> None:
        """Append each row's new token (and the ``alternatives`` it asked for: the batch's
        ``last_alternatives``) and settle finish reasons."""
        extras = alternatives or [None] * len(seqs)
        for seq, token, logprob, extra in zip(seqs, tokens.tolist(), logprobs.tolist(), extras, strict=True):
            if seq.finished:  # aborted while the step ran
                continue
            seq.output_ids.append(token)
            seq.logprobs.append(logprob)
            if extra is not None:
                seq.alternatives.append(extra)
            seq.finish_reason = finish_check(seq, self.eos_ids, self.tokenizer)

    def output_text(self, seq: Sequence) -> str:
        """The decoded completion, cut before a matched stop string or stop token (as SGLang)."""
        ids = seq.output_ids
        reason = seq.finish_reason or {}
        if reason.get("type") == "stop" and isinstance(reason.get("matched"), int):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)
        if reason.get("type") == "stop" and isinstance(reason.get("matched"), str):
            text = text[: text.find(reason["matched"])] if reason["matched"] in text else text
        return text

    def generate(self, seqs: list[Sequence], max_batch: int = 64) -> list[Sequence]:
        """Run ``seqs`` to completion (in chunks of ``max_batch``) without any server."""
        for seq in seqs:
            self.admit(seq)
        pending = [s for s in seqs if not s.finished]
        for start in range(0, len(pending), max_batch):
            chunk = pending[start:start + max_batch]
            batch, tokens, logprobs = self.prefill(chunk)
            self.record(batch.seqs, tokens, logprobs, batch.last_alternatives)
            while batch is not None:
                batch = self.select(batch, [i for i, s in enumerate(batch.seqs) if not s.finished])
                if batch is not None:
                    tokens, logprobs = self.step(batch)
                    self.record(batch.seqs, tokens, logprobs, batch.last_alternatives)
        return seqs


def finish_check(seq: Sequence, eos_ids: set[int], tokenizer) -> dict | None:
    """SGLang's finish reasons after the newest token of ``seq`` (None: keep going)."""
    token = seq.output_ids[-1]
    if token in seq.params.stop_token_ids or (token in eos_ids and not seq.params.ignore_eos):
        return {"type": "stop", "matched": token}
    if seq.params.stop:
        tail = tokenizer.decode(seq.output_ids[-64:], skip_special_tokens=False)
        for stop in seq.params.stop:
            if stop and stop in tail:
                return {"type": "stop", "matched": stop}
    if len(seq.output_ids) >= seq.max_new_tokens:
        return {"type": "length", "length": seq.max_new_tokens}
    return None


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, list) else [value])
    return {int(i) for i in ids if i is not None}


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

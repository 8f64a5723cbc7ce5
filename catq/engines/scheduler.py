"""The engine's scheduler: one asyncio task that keeps a single batch decoding.

Requests put sequences on a waiting queue and await their futures. Before every step the loop
admits waiting sequences (prefill, then merge into the running batch, up to ``max_batch`` rows),
runs one decode step for the whole batch, records tokens, and resolves the futures of finished
sequences, which then leave the batch. Model work runs on one worker thread, so the HTTP side
stays responsive while a step runs (torch releases the GIL).

Weight updates: admission stops, running sequences finish (or are aborted with
``abort_all_requests``), weights are copied in place from disk, ``weight_version`` is set, and
admission resumes; queued requests simply wait. ``pause``/``resume`` stop and restart all steps.
``stats`` counts forward passes and the largest batch seen: a timing-free batching signal.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch

from catq.engines.batching import Batch, BatchGenerator, Sequence
from catq.engines.lora import fits_batch

log = structlog.get_logger()


@dataclass
class EngineStats:
    forward_passes: int = 0
    prefills: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    finished_sequences: int = 0
    max_batch_size: int = 0
    """Most sequences ever decoded in one forward pass."""
    num_running: int = 0
    num_waiting: int = 0
    weight_updates: int = 0


class Scheduler:
    def __init__(self, generator: BatchGenerator, *, max_batch: int = 64, weight_version: str = "default"):
        self.gen = generator
        self.max_batch = max_batch
        self.weight_version = weight_version
        self.stats = EngineStats()
        self._waiting: deque[tuple[Sequence, asyncio.Future]] = deque()
        self._futures: dict[str, asyncio.Future] = {}
        self._running: Batch | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._paused = False
        self._admitting = True
        self._update_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catq-engine")
        self._task: asyncio.Task | None = None

    # -- public API -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="catq-engine-scheduler")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._abort_all("engine shutting down")
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, seqs: list[Sequence]) -> list[Sequence]:
        """Queue ``seqs`` (already ``admit``-validated) and wait until all are finished.
        Cancelling the caller (client gone) aborts them."""
        loop = asyncio.get_running_loop()
        futures = []
        for seq in seqs:
            future = loop.create_future()
            futures.append(future)
            if seq.finished:
                future.set_result(seq)
                continue
            self._futures[seq.seq_id] = future
            self._waiting.append((seq, future))
        self._wake.set()
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for seq in seqs:
                self._abort(seq, "client disconnected")
            raise

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def update_weights(self, load: Callable[[], None], source: str, version: str | None,
                             abort_all: bool) -> tuple[bool, str, int]:
        """Run ``load`` (it changes the model's weights in place; ``source`` names where they come
        from) once no sequence is running; (success, message, paused)."""
        async with self._update_lock:
            self._admitting = False
            try:
                if abort_all:
                    self._abort_all("aborted for a weight update")
                await self._idle.wait()
                held = len(self._waiting)
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(self._executor, load)
                except (OSError, ValueError, RuntimeError) as exc:
                    return False, f"Failed to load weights from {source}: {exc}", held
                if version is not None:
                    self.weight_version = version
                self.stats.weight_updates += 1
                log.info("weights updated", source=source, weight_version=self.weight_version)
                return True, f"Succeeded to update model weights from {source}.", held
            finally:
                self._admitting = True
                self._wake.set()

    def snapshot(self) -> dict:
        self.stats.num_waiting = len(self._waiting)
        self.stats.num_running = len(self._running) if self._running else 0
        self.stats.forward_passes = self.gen.forward_passes
        return asdict(self.stats)

    # -- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._paused or (self._running is None and not self._can_admit()):
                if self._running is None:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle.clear()
            try:
                if self._can_admit():
                    await self._admit(loop)
                if self._running is not None:
                    tokens, logprobs = await loop.run_in_executor(self._executor, self.gen.step, self._running)
                    self.stats.decode_steps += 1
                    self._record(self._running, tokens, logprobs)
            except Exception as exc:  # a failed step must not kill the server: fail its requests
                log.exception("engine step failed")
                self._abort_all(f"engine error: {exc}")
                self._running = None
            self._retire_finished()
            if self._running is None:
                self._idle.set()

    def _can_admit(self) -> bool:
        running = len(self._running) if self._running else 0
        return self._admitting and bool(self._waiting) and running < self.max_batch

    async def _admit(self, loop: asyncio.AbstractEventLoop) -> None:
        room = self.max_batch - (len(self._running) if self._running else 0)
        seqs = []
        deferred = []  # on an adapter the batch has no slot for (--max-loras-per-batch): next time
        running = self._running.seqs if self._running else []
        while self._waiting and len(seqs) < room:
            seq, future = self._waiting.popleft()
            if seq.finished:
                continue
            lora = getattr(self.gen, "lora", None)
            if lora is not None and not fits_batch(running, seq, seqs, lora.max_loras_per_batch):
                deferred.append((seq, future))
                continue
            seqs.append(seq)
        self._waiting.extendleft(reversed(deferred))
        if not seqs:
            return
        try:
            batch, tokens, logprobs = await loop.run_in_executor(self._executor, self.gen.prefill, seqs)
        except Exception:
            for seq in seqs:
                self._abort(seq, "engine error during prefill")
            raise
        self.stats.prefills += 1
        self._record(batch, tokens, logprobs)
        self._running = self.gen.merge(self._running, batch)

    def _record(self, batch: Batch, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(batch))
        live = sum(1 for s in batch.seqs if not s.finished)
        self.stats.generated_tokens += live
        self.gen.record(batch.seqs, tokens, logprobs, batch.last_alternatives)

    def _retire_finished(self) -> None:
        if self._running is None:
            return
        keep = []
        for i, seq in enumerate(self._running.seqs):
            if seq.finished:
                self._resolve(seq)
            else:
                keep.append(i)
        self._running = self.gen.select(self._running, keep)

    def _resolve(self, seq: Sequence) -> None:
        future = self._futures.pop(seq.seq_id, None)
        if future is not None and not future.done():
            self.stats.finished_sequences += 1
            future.set_result(seq)

    def _abort(self, seq: Sequence, message: str) -> None:
        if not seq.finished:
            seq.finish_reason = {"type": "abort", "message": message}
        self._resolve(seq)

    def abort_all(self, message: str) -> None:
        """End every waiting and running sequence with finish_reason "abort"."""
        self._abort_all(message)

    def _abort_all(self, message: str) -> None:
        while self._waiting:
            self._abort(self._waiting.popleft()[0], message)
        if self._running is not None:
            for seq in self._running.seqs:
                self._abort(seq, message)


def load_weights_in_place(model, path: Path) -> None:
    """Copy the safetensors weights of the HF directory ``path`` into ``model``'s parameters.
    Raises ValueError when the checkpoint does not fit the model (names or shapes)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    copy_weights_in_place(model, state, complete=True)


def copy_weights_in_place(model, state: dict[str, torch.Tensor], *, complete: bool) -> None:
    """Copy ``state`` into ``model``'s parameters and buffers, after checking every name and
    shape (ValueError, nothing copied, when one does not fit). ``complete``: every parameter
    must be there (a checkpoint); else a subset is fine (a broadcast may update some)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise ValueError(f"weights the model lacks: {unexpected[:5]}")
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(dict(model.named_parameters())) - set(state) - tied)
    if complete and missing:
        raise ValueError(f"checkpoint lacks weights: {missing[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != model's {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))

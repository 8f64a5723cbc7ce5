"""Sampling and batched decoding on a tiny random model (no server, no files beyond tmp)."""

from __future__ import annotations

import pytest
import torch

from catq.engines.batching import BatchGenerator, Sequence
from catq.engines.models import load_causal_lm, load_tokenizer
from catq.engines.sampling import RowParams, SamplingParams, sample
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401

LOGPROB_ATOL = 1e-4
"""Batched (left-padded, KV-cached) log-probs vs one plain forward pass, fp32 on CPU: they differ
only by float rounding (measured ~1e-6); 1e-4 is far below any effect on an importance ratio."""


@pytest.fixture(scope="module")
def generator(tiny_model_path) -> BatchGenerator:  # noqa: F811
    model = load_causal_lm(str(tiny_model_path))
    return BatchGenerator(model, load_tokenizer(str(tiny_model_path)), seed=0)


def rows(params: list[SamplingParams], vocab: int) -> RowParams:
    return RowParams.build(params, vocab, "cpu")


def test_logprobs_are_raw_logit_log_softmax_whatever_the_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=t) for t in (0.0, 0.3, 1.0, 3.0)]
    tokens, logprobs = sample(logits, rows(params, 50))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    assert tokens[0] == logits[0].argmax()


def test_top_k_and_top_p_restrict_the_draw():
    torch.manual_seed(0)
    logits = torch.randn(1, 100).repeat(300, 1)
    top5 = set(logits[0].topk(5).indices.tolist())
    tokens, _ = sample(logits, rows([SamplingParams(temperature=2.0, top_k=5)] * 300, 100))
    assert set(tokens.tolist()) <= top5
    assert len(set(tokens.tolist())) > 1
    tokens, _ = sample(logits, rows([SamplingParams(temperature=2.0, top_p=1e-6)] * 300, 100))
    assert set(tokens.tolist()) == {int(logits[0].argmax())}
    tokens, _ = sample(logits, rows([SamplingParams(temperature=1.0, top_k=1)] * 3, 100))
    assert set(tokens.tolist()) == {int(logits[0].argmax())}


def test_n_samples_per_prompt_have_matching_shapes(generator):
    seqs = [Sequence([1, 9690, 198], SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True))
            for _ in range(4)]
    seqs += [Sequence([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=3, temperature=0.7, ignore_eos=True))
             for _ in range(2)]
    generator.generate(seqs)
    for seq in seqs:
        assert len(seq.output_ids) == len(seq.logprobs) == seq.params.max_new_tokens
        assert seq.finish_reason == {"type": "length", "length": seq.params.max_new_tokens}
        assert all(lp <= 0 for lp in seq.logprobs)


def test_greedy_is_deterministic_and_independent_of_batch_mates(generator):
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    batched = [Sequence([1, 2, 3, 4], greedy), Sequence([1, 2, 3, 4], greedy),
               Sequence([40, 41], SamplingParams(max_new_tokens=8, temperature=1.0))]
    generator.generate(batched)
    [alone] = generator.generate([Sequence([1, 2, 3, 4], greedy)])
    assert batched[0].output_ids == batched[1].output_ids == alone.output_ids


def test_logprobs_equal_a_plain_forward_pass(generator):
    seqs = [Sequence(prompt, SamplingParams(max_new_tokens=10, temperature=0.9, ignore_eos=True))
            for prompt in ([1, 9690, 198, 2683], [77], [3, 1, 4, 1, 5, 9, 2, 6])]
    generator.generate(seqs)
    for seq in seqs:
        ids = torch.tensor([seq.prompt_ids + seq.output_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(generator.model(ids).logits[0].float(), -1)
        start = len(seq.prompt_ids) - 1
        expected = [logprobs[start + i, tok].item() for i, tok in enumerate(seq.output_ids)]
        assert seq.logprobs == pytest.approx(expected, abs=LOGPROB_ATOL)


def test_stop_string_ends_generation_and_is_trimmed(generator):
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    generator.generator.manual_seed(1234)  # the same draws in both runs
    [free] = generator.generate([Sequence([10, 11, 12], sampled)])
    pieces = [generator.tokenizer.decode([t]) for t in free.output_ids]
    index = next(i for i in range(2, len(pieces)) if pieces[i].strip() and pieces[i] not in "".join(pieces[:i]))
    stop = pieces[index]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True, stop=[stop])
    generator.generator.manual_seed(1234)
    [stopped] = generator.generate([Sequence([10, 11, 12], params)])
    assert stopped.finish_reason == {"type": "stop", "matched": stop}
    assert stopped.output_ids == free.output_ids[: index + 1]
    assert generator.output_text(stopped) == generator.tokenizer.decode(free.output_ids[:index])


def test_stop_token_ids_end_generation(generator):
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    [free] = generator.generate([Sequence([20, 21], greedy)])
    token = free.output_ids[3]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[token])
    [stopped] = generator.generate([Sequence([20, 21], params)])
    first = free.output_ids.index(token)
    assert stopped.output_ids == free.output_ids[: first + 1]
    assert stopped.finish_reason == {"type": "stop", "matched": token}


def test_a_sequence_joining_mid_flight_decodes_as_if_alone(generator):
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    early, late = Sequence(list(range(100, 112)), greedy), Sequence([7, 8], greedy)
    for seq in (early, late):
        generator.admit(seq)
    batch, tokens, logprobs = generator.prefill([early])
    generator.record(batch.seqs, tokens, logprobs)
    generator.record(batch.seqs, *generator.step(batch))
    joined, tokens, logprobs = generator.prefill([late])
    generator.record(joined.seqs, tokens, logprobs)
    batch = generator.merge(batch, joined)
    while batch is not None:
        batch = generator.select(batch, [i for i, s in enumerate(batch.seqs) if not s.finished])
        if batch is not None:
            generator.record(batch.seqs, *generator.step(batch))
    for seq in (early, late):
        [alone] = generator.generate([Sequence(list(seq.prompt_ids), greedy)])
        assert seq.output_ids == alone.output_ids
        assert seq.logprobs == pytest.approx(alone.logprobs, abs=LOGPROB_ATOL)


def test_zero_new_tokens_and_overlong_prompts(generator):
    [empty] = generator.generate([Sequence([1, 2], SamplingParams(max_new_tokens=0))])
    assert empty.output_ids == [] and empty.finish_reason == {"type": "length", "length": 0}
    with pytest.raises(ValueError, match="context"):
        generator.admit(Sequence([1] * (generator.context_len + 1), SamplingParams()))
    with pytest.raises(ValueError, match="out of range"):
        generator.admit(Sequence([generator.vocab_size], SamplingParams()))

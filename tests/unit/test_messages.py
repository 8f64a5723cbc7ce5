"""Every message type survives encode/decode; anything else raises MessageDecodeError."""

from __future__ import annotations

import msgpack
import pytest

from catq.messages import (
    SCHEMA_VERSION,
    ChatMessage,
    DeadLetter,
    Float32s,
    Int32s,
    MessageDecodeError,
    Prompt,
    ReferencedGroup,
    Rollout,
    RolloutGroup,
    ScoredGroup,
    Verdict,
    WeightsPublished,
    decode,
    describe,
    encode,
    prompt_id_of,
)


def sample_prompt() -> Prompt:
    return Prompt(prompt_id="p1", task="open",
                  messages=[ChatMessage("system", "Be brief."), ChatMessage("user", "Why is the sky blue?")])


def sample_group() -> RolloutGroup:
    rollouts = [Rollout(text=f"answer {i}", token_ids=[1, 2, 3 + i], logprobs=[-0.5, -1.25, -0.0],
                        finish_reason="stop") for i in range(3)]
    return RolloutGroup(prompt=sample_prompt(), prompt_token_ids=[9, 8, 7], rollouts=rollouts, policy_version=2)


def sample_referenced() -> ReferencedGroup:
    return ReferencedGroup(group=sample_group(), reference="Rayleigh scattering.", estimator="synthesis",
                           anchor_output="<summary>..</summary>", reference_answer=None,
                           rubric=["Mentions scattering", "Mentions wavelength"], anchor_version=0)


def sample_scored() -> ScoredGroup:
    verdicts = [Verdict(rollout_index=0, criterion_index=1, satisfied=True, raw="yes"),
                Verdict(rollout_index=1, criterion_index=0, satisfied=False, raw="maybe", parsed=False)]
    return ScoredGroup(referenced=sample_referenced(), rewards=[1.0, 0.5, 0.0],
                       rollout_answers=["a", None, "c"], verdicts=verdicts)


ALL = [
    sample_prompt(),
    sample_group(),
    sample_referenced(),
    sample_scored(),
    WeightsPublished(policy_version=3, path="/runs/x/weights/v3", step=12),
    DeadLetter(stream="prompts", entry_id="1-0", payload=b"\x00\xffraw", error="boom", attempts=3, worker="w1"),
]


@pytest.mark.parametrize("message", ALL, ids=[type(m).__name__ for m in ALL])
def test_round_trip(message):
    data = encode(message)
    assert isinstance(data, bytes)
    assert decode(data) == message
    assert decode(data, expected=type(message)) == message


def test_float_fields_accept_integers_and_stay_floats():
    group = sample_group()
    group.rollouts[0].logprobs = [0, -1, -2]
    back = decode(encode(group))
    assert back.rollouts[0].logprobs == [0.0, -1.0, -2.0]
    assert all(type(v) is float for v in back.rollouts[0].logprobs)


def test_wrong_expected_type_raises():
    with pytest.raises(MessageDecodeError, match="expected RolloutGroup, got Prompt"):
        decode(encode(sample_prompt()), expected=RolloutGroup)


@pytest.mark.parametrize("cut", [0, 1, 5, 20, -1])
def test_truncated_bytes_raise(cut):
    data = encode(sample_scored())
    with pytest.raises(MessageDecodeError):
        decode(data[:cut] if cut >= 0 else data[:-1])


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"garbage!", b"\xff" * 32, msgpack.packb([1, 2, 3]), msgpack.packb({"schema": 1}),
    msgpack.packb({"schema": SCHEMA_VERSION + 1, "type": "Prompt", "body": {}}),
    msgpack.packb({"schema": SCHEMA_VERSION, "type": "Pickle", "body": {}}),
    msgpack.packb({"schema": SCHEMA_VERSION, "type": "Prompt", "body": {"prompt_id": "x"}}),
    msgpack.packb({"schema": SCHEMA_VERSION, "type": "Prompt",
                   "body": {"prompt_id": "x", "task": "poetry", "messages": []}}),
    msgpack.packb({"schema": SCHEMA_VERSION, "type": "WeightsPublished",
                   "body": {"policy_version": "3", "path": "/w", "step": 1}}),
    msgpack.packb({"schema": SCHEMA_VERSION, "type": "WeightsPublished",
                   "body": {"policy_version": True, "path": "/w", "step": 1}}),
    msgpack.packb({"schema": SCHEMA_VERSION, "type": "WeightsPublished",
                   "body": {"policy_version": 3, "path": "/w", "step": 1, "extra": 0}}),
], ids=lambda d: repr(d[:16]))
def test_garbage_raises(data):
    with pytest.raises(MessageDecodeError):
        decode(data)


def test_wrong_element_type_in_token_list_raises():
    raw = msgpack.unpackb(encode(sample_group()))
    raw["body"]["rollouts"][0]["token_ids"] = [1, "two"]  # a plain list (older producer), bad
    with pytest.raises(MessageDecodeError, match="token_ids"):
        decode(msgpack.packb(raw))


def test_token_ids_and_logprobs_travel_packed_and_come_back_equal():
    group = sample_group()
    raw = msgpack.unpackb(encode(group))
    packed = raw["body"]["rollouts"][0]["token_ids"]
    assert isinstance(packed, msgpack.ExtType) and len(packed.data) == 4 * len(group.rollouts[0].token_ids)
    back = decode(encode(group))
    assert back == group and back.rollouts[0].token_ids == list(group.rollouts[0].token_ids)
    assert isinstance(back.rollouts[0].token_ids, Int32s) and isinstance(back.rollouts[0].logprobs, Float32s)


def test_a_plain_list_from_an_older_producer_is_accepted_and_a_malformed_pack_is_not():
    raw = msgpack.unpackb(encode(sample_group()))
    raw["body"]["prompt_token_ids"] = [1, 2, 3]
    assert decode(msgpack.packb(raw)).prompt_token_ids == [1, 2, 3]
    raw["body"]["prompt_token_ids"] = msgpack.ExtType(1, b"\x01\x02\x03")  # not a whole int32
    with pytest.raises(MessageDecodeError, match="malformed packed array"):
        decode(msgpack.packb(raw))


def test_describe_and_prompt_id():
    assert describe(ALL[-1])["payload"] == "<5 bytes>"
    assert [prompt_id_of(m) for m in ALL] == ["p1", "p1", "p1", "p1", None, None]

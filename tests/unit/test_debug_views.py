"""The pure parts of `catq trace`, `catq tail`, `catq top` and the Prometheus metrics: no Redis."""

from __future__ import annotations

import io
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from catq import metrics
from catq.config import MetricsConfig
from catq.messages import (
    ChatMessage,
    DeadLetter,
    Prompt,
    ReferencedGroup,
    Rollout,
    RolloutGroup,
    ScoredGroup,
    Verdict,
    WeightsPublished,
    encode,
    from_json,
    to_json,
)
from catq.ops.tail import parse_duration
from catq.ops.readable import entry_block, print_block
from catq.ops.top import percentile, role_work
from catq.ops.trace import build_trace

PROMPT = Prompt("p1", "open", [ChatMessage("user", "Two tips for sleep?")], created_at=1000.0)
GROUP = RolloutGroup(PROMPT, [1, 2], [Rollout("Dim the lights.\nRead.", [5] * 40, [-0.1] * 40, "stop"),
                                      Rollout("x" * 5000, [6] * 900, [-0.2] * 900, "length")], 1)
REF = ReferencedGroup(GROUP, "Keep a schedule.", "synthesis", "raw", rubric=["Mentions a schedule", "Is short"])
SCORED = ScoredGroup(REF, [0.5, 0.0], verdicts=[Verdict(0, 0, True, "yes"), Verdict(0, 1, False, "no"),
                                                Verdict(1, 0, False, "no"), Verdict(1, 1, False, "?", parsed=False)])


def entries() -> list[tuple[str, str, bytes | None]]:
    return [("prompts", "1000500-0", encode(PROMPT)), ("groups", "1002000-0", encode(GROUP)),
            ("references", "1003000-0", encode(REF)), ("scored", "1003250-0", encode(SCORED))]


def test_trace_orders_stages_with_latencies_and_the_learner_verdict():
    result = {"status": "trained", "trained_in_version": 2, "trained_step": 4, "updated_at": 1010.0}
    trace = build_trace("p1", entries(), result)
    assert [s["stage"] for s in trace["stages"]] == ["ingest", "rollout", "anchor", "judge", "learner"]
    assert [s["latency_s"] for s in trace["stages"]] == [None, 1.5, 1.0, 0.25, 6.75]
    judge = trace["stages"][3]
    assert judge["rewards"] == [0.5, 0.0]
    assert judge["criteria"] == [{"criterion": "Mentions a schedule", "satisfied": "✓✗"},
                                 {"criterion": "Is short", "satisfied": "✗?"}]
    assert trace["stages"][2]["rubric"] == REF.rubric and trace["task"] == "open"
    assert trace["stages"][4]["trained_in_version"] == 2
    json.dumps(trace)  # JSON-able as it is


def test_trace_without_the_prompts_entry_takes_ingest_from_the_message_and_names_trimmed_entries():
    trimmed = [("prompts", "999-0", None)] + entries()[1:]
    trace = build_trace("p1", trimmed, {"status": "set_aside", "set_aside": "no signal", "updated_at": 1004.0})
    assert trace["stages"][0]["stage"] == "ingest" and trace["stages"][0]["at"] == 1000.0
    assert trace["stages"][-1]["set_aside"] == "no signal" and trace["missing"] == ["prompts 999-0"]


def test_trace_of_a_dead_letter_names_its_reason():
    letter = DeadLetter("groups", "1002000-0", encode(GROUP), "anchor refused", 3, "w1")
    trace = build_trace("p1", entries()[:2] + [("dead", "1004000-0", encode(letter))], {"status": "dead"})
    dead = trace["stages"][-1]
    assert (dead["stage"], dead["error"], dead["attempts"], dead["from_stream"]) == ("dead", "anchor refused", 3, "groups")


@pytest.mark.parametrize("message", [PROMPT, GROUP, REF, SCORED, WeightsPublished(2, "/w/v2", 4),
                                     DeadLetter("groups", "1-0", encode(GROUP), "boom", 2),
                                     DeadLetter("prompts", "1-0", b"junk", "undecodable", 1)])
def test_json_round_trips_every_message_type(message):
    assert from_json(json.loads(json.dumps(to_json(message)))) == message


def test_blocks_summarise_long_arrays_and_fit_the_width():
    out = Console(file=io.StringIO(), width=50, force_terminal=False)
    for stream, entry_id, payload in entries():
        print_block(out, *entry_block(stream, entry_id, payload))
    text = out.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 50
    assert "[900 tok, length]" in text and "criterion 1  ✗?" in text
    title, rows = entry_block("dead", "5-0", encode(DeadLetter("groups", "1-0", encode(GROUP), "boom", 2)))
    assert ("error", "boom") in rows and any(label.strip() == "answer 1" for label, _ in rows)


def test_parse_duration():
    assert [parse_duration(t) for t in ("90", "30s", "10m", "2h", "1d")] == [90, 30, 600, 7200, 86400]
    for bad in ("soon", "-5m", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_role_work_throughput_and_percentiles():
    now = 10_000.0
    samples = [(now - i, 0.1 * (i + 1), "handled") for i in range(30)] + [(now - 500, 9.0, "handled"),
                                                                           (now - 1, 5.0, "failed")]
    work = role_work({"handled": 31, "failed": 1}, samples, now=now)
    assert work.per_s == pytest.approx(30 / 60)
    assert work.p50_s == pytest.approx(1.7) and work.p95_s == pytest.approx(5.0)
    assert percentile([], 0.5) is None


def test_metrics_ports_per_role_base_port_and_off_by_default():
    assert MetricsConfig().port_for("judge") == 0
    assert MetricsConfig(base_port=9100).port_for("rollout") == 9101
    assert MetricsConfig(base_port=9100, ports={"judge": 9200}).port_for("judge") == 9200
    assert MetricsConfig(port=9100).port_for("syncer") == 9100
    assert MetricsConfig(port=9100).port_for("ingest") == 0  # ingest serves /metrics on its API port


def samples() -> dict:
    text = metrics.exposition()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_handled_messages_learner_steps_and_reloads_are_counted():
    before = samples()
    metrics.handled("unit-role", "handled", 0.2)
    metrics.handled("unit-role", "dead", 0.1)
    metrics.learner_step({"step": 7, "loss": 0.5, "kl": 0.01, "reward_mean": 0.75, "signal_frac": 0.5,
                          "step_time_s": 3.0, "policy_version": 2, "staleness": {"0": 1}})
    metrics.weights_reloaded("http://e:1", 2, 1.5)
    after = samples()
    role = (("role", "unit-role"),)
    assert after[("catq_messages_handled_total", role)] == before.get(("catq_messages_handled_total", role), 0) + 1
    assert after[("catq_dead_lettered_total", role)] >= 1 and after[("catq_handler_seconds_count", role)] >= 2
    assert after[("catq_learner_reward_mean", ())] == 0.75 and after[("catq_learner_step", ())] == 7
    assert after[("catq_syncer_served_version", (("engine", "http://e:1"),))] == 2


def test_renderers_are_keyed_by_the_topologys_streams():
    from catq.ops import readable, trace
    from catq.topology import STREAMS, WEIGHTS, stage_name, stream_of

    assert list(readable.ROWS) == list(STREAMS)  # every stream's entries have a renderer
    assert set(trace.STAGE_FIELDS) == set(STREAMS) - {WEIGHTS}  # weights name no prompt
    assert [stage_name(s) for s in trace.STAGE_FIELDS] == ["ingest", "rollout", "anchor", "judge", "dead"]
    assert set(trace.STAGE_ROWS) == {stage_name(s) for s in trace.STAGE_FIELDS} | {trace.LEARNER}
    assert trace.LAST_STREAMS == ("dead", "scored", "references", "groups", "prompts")
    assert all(stream_of(object.__new__(s.message)) is s for s in STREAMS)

"""Prometheus metrics of every role (``prometheus-client``), served on ``/metrics``.

Stream roles count in one place, the worker loop of :mod:`catq.runtime`; the learner reports its
per-step metrics dict (:func:`learner_step`), the syncer each reload (:func:`weights_reloaded`),
ingest the run's stream gauges (:func:`stream_gauges`) on its own HTTP port. A role serves
``/metrics`` on the port :meth:`catq.config.MetricsConfig.port_for` gives it (off by default).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

REGISTRY = CollectorRegistry()
"""catq's own registry: no process or GC collectors, so every line is about the run."""

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

MESSAGES = Counter("catq_messages_handled", "Messages a stream role completed.", ["role"], registry=REGISTRY)
FAILURES = Counter("catq_handler_failures", "Handler failures (counted toward max_attempts).", ["role"],
                   registry=REGISTRY)
DEAD_LETTERS = Counter("catq_dead_lettered", "Entries this role sent to the dead-letter stream.", ["role"],
                       registry=REGISTRY)
HANDLER_SECONDS = Histogram("catq_handler_seconds", "Handler latency per message.", ["role"],
                            buckets=LATENCY_BUCKETS, registry=REGISTRY)

LEARNER_STEP_SECONDS = Gauge("catq_learner_step_seconds", "Wall time of the last learner step.",
                             registry=REGISTRY)
LEARNER_STEPS = Counter("catq_learner_steps", "Optimizer steps taken by this learner process.",
                        registry=REGISTRY)
LEARNER_GAUGES = {
    key: Gauge(f"catq_learner_{key}", f"The learner's last step: {key} (see metrics.jsonl).", registry=REGISTRY)
    for key in ("step", "loss", "kl", "reward_mean", "signal_frac", "policy_version")
}

SYNC_SECONDS = Histogram("catq_syncer_reload_seconds", "Time to move one engine to new weights.",
                         buckets=LATENCY_BUCKETS, registry=REGISTRY)
SERVED_VERSION = Gauge("catq_syncer_served_version", "Policy version an engine serves.", ["engine"],
                       registry=REGISTRY)

STREAM_LENGTH = Gauge("catq_stream_length", "Entries currently in a stream.", ["run", "stream"],
                      registry=REGISTRY)
GROUP_PENDING = Gauge("catq_group_pending", "Entries delivered to a consumer group and not yet acknowledged.",
                      ["run", "stream", "group"], registry=REGISTRY)
GROUP_LAG = Gauge("catq_group_lag", "Entries not yet delivered to a consumer group.",
                  ["run", "stream", "group"], registry=REGISTRY)
GROUP_CONSUMERS = Gauge("catq_group_consumers", "Consumers registered in a consumer group.",
                        ["run", "stream", "group"], registry=REGISTRY)
DEAD_LETTER_STREAM = Gauge("catq_dead_letters", "Entries in the dead-letter stream.", ["run"], registry=REGISTRY)


def handled(role: str, outcome: str, seconds: float) -> None:
    """One message a stream worker finished: ``outcome`` is handled, failed or dead."""
    HANDLER_SECONDS.labels(role).observe(seconds)
    {"handled": MESSAGES, "failed": FAILURES, "dead": DEAD_LETTERS}[outcome].labels(role).inc()


def learner_step(metrics: dict[str, Any]) -> None:
    """The learner's per-step metrics line (its numeric keys we export)."""
    LEARNER_STEPS.inc()
    if "step_time_s" in metrics:
        LEARNER_STEP_SECONDS.set(metrics["step_time_s"])
    for key, gauge in LEARNER_GAUGES.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            gauge.set(value)


def weights_reloaded(engine: str, version: int, seconds: float) -> None:
    SYNC_SECONDS.observe(seconds)
    SERVED_VERSION.labels(engine).set(version)


def stream_gauges(run: str, stats: dict[str, Any]) -> None:
    """Set the stream gauges from :meth:`catq.bus.Bus.stats` (ingest, before each scrape)."""
    for stream, info in stats.items():
        STREAM_LENGTH.labels(run, stream).set(info["length"])
        for g in info["groups"]:
            GROUP_PENDING.labels(run, stream, g["group"]).set(g["pending"])
            GROUP_CONSUMERS.labels(run, stream, g["group"]).set(len(g["consumers"]))
            if g.get("lag") is not None:
                GROUP_LAG.labels(run, stream, g["group"]).set(g["lag"])
    DEAD_LETTER_STREAM.labels(run).set(stats.get("dead", {}).get("length", 0))


def exposition() -> tuple[bytes, str]:
    """The registry as Prometheus text, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` from a background thread (prometheus-client's own server)."""
    start_http_server(port, addr=host, registry=REGISTRY)

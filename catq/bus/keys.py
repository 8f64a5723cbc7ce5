"""Where a run's data lives in Redis: every key of a run is ``catq:{<run>}:<name>``.

The braces are a Redis Cluster hash tag: all of a run's keys hash to one slot, so every script,
which touches several streams, runs on one node, and runs spread over a cluster (``bus.cluster``).
"""

from __future__ import annotations


def run_key(run: str, name: str) -> str:
    """The Redis key ``name`` of ``run``: ``catq:{<run>}:<name>``, hash-tagged by run (see the
    module docstring)."""
    return f"catq:{{{run}}}:{name}"


def legacy_run_key(run: str, name: str) -> str:
    """Where a key lived before keys were hash-tagged (``catq:<run>:<name>``); see
    :meth:`Bus.migrate_legacy_keys`."""
    return f"catq:{run}:{name}"


class KeyLayout:
    """The names of one run's keys (no Redis access): streams, markers, traces, records."""

    run: str

    def key(self, name: str) -> str:
        return run_key(self.run, name)

    def done_key(self, stream: str, group: str, entry_id: str) -> str:
        return self.key(f"done:{stream}:{group}:{entry_id}")

    def failures_key(self, stream: str, group: str, entry_id: str) -> str:
        return self.key(f"failures:{stream}:{group}:{entry_id}")

    def trace_key(self, prompt_id: str) -> str:
        return self.key(f"trace:{prompt_id}")

    def heartbeat_key(self, role: str, worker_id: str) -> str:
        return self.key(f"heartbeat:{role}:{worker_id}")

    def role_stats_key(self, role: str) -> str:
        return self.key(f"rolestats:{role}")

    def latency_key(self, role: str) -> str:
        return self.key(f"latency:{role}")

    def replicas_key(self, pool: str) -> str:
        return self.key(f"replicas:{pool}")

    def lease_keys(self, name: str) -> list[str]:
        """The lease key (holder, expiring) and its fencing counter (never expires)."""
        return [self.key(f"lease:{name}"), self.key(f"fence:{name}")]

    def trained_key(self, prompt_id: str, policy_version: int) -> str:
        return self.key(f"trained:{prompt_id}:{policy_version}")

"""The stream topology is one table; what reads it agrees with it."""

import ast
from pathlib import Path

import pytest

from catq import topology
from catq.topology import GROUPS, PROMPTS, REFERENCES, SCORED, downstream_of, input_of

ROOT = Path(__file__).resolve().parents[2]


def test_readme_shows_the_stream_table_as_topology_defines_it():
    assert topology.markdown_table() in (ROOT / "README.md").read_text()


def test_every_stream_role_reads_its_stage_and_queues_behind_the_later_ones():
    assert [input_of(r) for r in ("rollout", "anchor", "judge", "learner")] == [PROMPTS, GROUPS, REFERENCES, SCORED]
    assert downstream_of("rollout") == (GROUPS, REFERENCES, SCORED)
    assert downstream_of("learner") == ()
    with pytest.raises(KeyError, match="consumes no work stream"):
        input_of("ingest")


def test_every_producer_and_consumer_is_a_role():
    for s in topology.STREAMS:
        assert s.producer in (*topology.ROLES, "any")
        assert s.consumer is None or s.consumer in topology.ROLES


def test_every_role_has_an_entry_point_that_imports_its_run():
    for role in topology.ROLES:
        tree = ast.parse((ROOT / "workers" / f"{role}.py").read_text())
        imported = [a.name for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names]
        assert "run" in imported, role


def test_only_the_bus_touches_redis():
    offenders = []
    bus = ROOT / "catq" / "bus"
    assert "import redis" in (bus / "connection.py").read_text()
    for path in (ROOT / "catq").rglob("*.py"):
        if path.parent == bus:
            continue
        text = path.read_text()
        if ".redis." in text or "import redis" in text or "from redis" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []

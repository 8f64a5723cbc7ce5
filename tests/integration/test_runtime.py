"""The worker runtime with real worker processes: crashes, poison, SIGTERM, Redis restarts."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess

import pytest
import redis as sync_redis
import structlog

from catq.bus import Bus, Output
from catq.config import BusConfig
from catq.messages import ChatMessage, DeadLetter, Prompt, decode
from catq.results import ResultStore
from catq.runtime import run_worker
from catq.topology import PROMPTS
from tests.conftest import make_config

from .procs import free_port, start_bus_worker, stop_process, wait_for


def prompt(text: str, pid: str | None = None) -> Prompt:
    return Prompt(prompt_id=pid or text, task="math", messages=[ChatMessage("user", text)])


async def echoed(bus: Bus) -> list[tuple[str, str]]:
    """(source entry id, prompt text) of every output."""
    entries = await bus.redis.xrange(bus.key("echoed"))
    return [(f[b"source"].decode(), decode(f[b"message"]).question) for _, f in entries]


async def pending_ids(bus: Bus, consumer: str | None = None) -> list[str]:
    try:
        rows = await bus.redis.xpending_range(bus.key("prompts"), "echo", "-", "+", 100, consumername=consumer)
    except sync_redis.ResponseError:  # no group yet
        return []
    return [r["message_id"].decode() for r in rows]


@pytest.fixture
def workers(tmp_path):
    """Start bus_worker processes; every one still running is stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(redis_url: str, run: str, *args: str) -> subprocess.Popen:
        proc = start_bus_worker(redis_url, run, tmp_path / f"worker{len(procs)}.log", *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


@pytest.mark.slow  # starts processes
async def test_sigkilled_consumer_work_is_finished_by_another_once(bus, run_name, redis_url, workers):
    entry = await bus.publish("prompts", prompt("sleep:1.5"))
    first = workers(redis_url, run_name, "--worker-id", "doomed", "--claim-idle-ms", "600")
    await wait_for(lambda: pending_ids(bus, "doomed"), what="doomed to hold the entry")
    first.send_signal(signal.SIGKILL)
    first.wait()
    workers(redis_url, run_name, "--worker-id", "rescuer", "--claim-idle-ms", "600")
    await wait_for(lambda: echoed(bus), timeout=15, what="the rescuer's output")
    await asyncio.sleep(1.0)  # room for a duplicate, were there going to be one
    assert await echoed(bus) == [(entry, "sleep:1.5")]
    assert await pending_ids(bus) == []


@pytest.mark.slow  # starts processes
async def test_poison_and_failing_entries_are_dead_lettered_and_worker_goes_on(bus, run_name, redis_url, workers):
    ids = {text: await bus.publish("prompts", prompt(text)) for text in ("poison", "fail", "ok1", "ok2")}
    proc = workers(redis_url, run_name, "--claim-idle-ms", "300", "--max-attempts", "2")
    await wait_for(lambda: bus.redis.xlen(bus.key("dead")), what="a dead letter")
    letters = await wait_for(lambda: _dead(bus, 2), timeout=15, what="two dead letters")
    by_id = {d.entry_id: d for d in letters}
    assert by_id[ids["poison"]].error == "poison prompt" and by_id[ids["poison"]].attempts == 1
    assert by_id[ids["fail"]].error == "failed 2 times; last: asked to fail"
    late = await bus.publish("prompts", prompt("ok3"))
    await wait_for(lambda: _has_output(bus, late), what="output after the dead letters")
    assert sorted(t for _, t in await echoed(bus)) == ["ok1", "ok2", "ok3"]
    assert proc.poll() is None
    assert await pending_ids(bus) == []
    results = ResultStore(bus, 60)
    poisoned, failed = await results.get("poison"), await results.get("fail")
    assert poisoned["status"] == "dead" and poisoned["error"] == "poison prompt"
    assert failed["status"] == "dead" and failed["error"] == "failed 2 times; last: asked to fail"
    assert await results.get("ok1") is None  # only dead letters write results here


@pytest.mark.slow  # starts processes
async def test_a_dependency_down_longer_than_max_attempts_reclaims_costs_nothing(
        bus, run_name, redis_url, workers, tmp_path):
    down = tmp_path / "engine-down"
    down.touch()
    entry = await bus.publish("prompts", prompt(f"down:{down}"))
    workers(redis_url, run_name, "--claim-idle-ms", "300", "--max-attempts", "2")
    await wait_for(lambda: pending_ids(bus), timeout=30, what="the worker to take the entry")
    await asyncio.sleep(3.0)  # ten claim-idle periods, five times max_attempts
    assert await bus.redis.xlen(bus.key("dead")) == 0
    before = await bus.publish("prompts", prompt("ok-while-down"))
    await asyncio.sleep(1.0)
    assert not await _has_output(bus, before)  # the worker reads nothing new while it waits
    down.unlink()
    await wait_for(lambda: _has_output(bus, before), timeout=15, what="work after the engine is back")
    await wait_for(lambda: _has_output(bus, entry), timeout=15, what="the waiting entry")
    assert await bus.redis.xlen(bus.key("dead")) == 0
    assert await pending_ids(bus) == []


@pytest.mark.slow  # starts processes
async def test_a_hung_handler_is_abandoned_at_its_deadline_and_dead_lettered_at_max_attempts(
        bus, run_name, redis_url, workers):
    hung = await bus.publish("prompts", prompt("hang"))
    proc = workers(redis_url, run_name, "--claim-idle-ms", "300", "--max-attempts", "2", "--deadline", "0.5")
    (letter,) = await wait_for(lambda: _dead(bus, 1), timeout=15, what="the hung entry dead-lettered")
    assert letter.entry_id == hung and "ran past the message deadline (0.5 s)" in letter.error
    ok = await bus.publish("prompts", prompt("ok"))
    await wait_for(lambda: _has_output(bus, ok), what="the worker still working")
    assert proc.poll() is None


async def _dead(bus: Bus, n: int) -> list[DeadLetter] | None:
    entries = await bus.redis.xrange(bus.key("dead"))
    return [decode(f[b"message"]) for _, f in entries] if len(entries) >= n else None


async def _has_output(bus: Bus, entry_id: str) -> bool:
    return any(src == entry_id for src, _ in await echoed(bus))


@pytest.mark.slow  # starts processes
async def test_sigterm_finishes_or_leaves_pending_never_acks_without_output(bus, run_name, redis_url, workers):
    texts = ["sleep:1.0", "sleep:1.0", "sleep:60", "sleep:60"]
    ids = [await bus.publish("prompts", prompt(t, f"p{i}")) for i, t in enumerate(texts)]
    proc = workers(redis_url, run_name, "--worker-id", "w", "--concurrency", "4", "--grace", "2.5")
    await wait_for(lambda: _count_is(pending_ids(bus, "w"), 4), what="all four in flight")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    outputs = dict(await echoed(bus))
    pending = set(await pending_ids(bus))
    assert set(outputs) == set(ids[:2])  # the short ones finished within the grace period
    assert pending == set(ids[2:])  # the long ones were abandoned, still pending
    for entry in ids:  # acked <=> has its output
        assert (entry not in pending) == (entry in outputs)
    assert await bus.redis.keys(bus.key("heartbeat:echo:*")) == []
    consumers = await bus.redis.xinfo_consumers(bus.key("prompts"), "echo")
    assert [c["name"] for c in consumers] == [b"w"]  # still holds entries, so kept


@pytest.mark.slow  # starts processes
async def test_clean_stop_removes_idle_consumer(bus, run_name, redis_url, workers):
    await bus.publish("prompts", prompt("hi"))
    proc = workers(redis_url, run_name, "--worker-id", "w")
    await wait_for(lambda: echoed(bus), what="output")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert await bus.redis.xinfo_consumers(bus.key("prompts"), "echo") == []


async def _count_is(awaitable, n: int) -> bool:
    return len(await awaitable) == n


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_worker_survives_redis_restart_without_losing_entries(tmp_path, workers):
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(tmp_path)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    bus = Bus(url, "restart", BusConfig(claim_idle_ms=500, block_ms=100), reconnect_timeout_s=None)
    proc = None
    try:
        await wait_for(lambda: _pings(url), what="test redis up")
        proc = workers(url, "restart", "--claim-idle-ms", "500")
        published: list[str] = []

        async def produce() -> None:
            for i in range(40):
                published.append(await bus.publish("prompts", prompt("sleep:0.05", pid=f"p{i}")))
                await asyncio.sleep(0.05)

        producer = asyncio.create_task(produce())
        await wait_for(lambda: len(published) >= 10, what="some traffic")
        sync_redis.Redis(port=port).shutdown(save=True)  # data kept in dump.rdb, like AOF in compose
        server.wait(timeout=10)
        await asyncio.sleep(3)  # Redis away for a few seconds; producer and worker retry
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        await asyncio.wait_for(producer, timeout=30)
        await wait_for(lambda: _all_done(bus, published), timeout=20, what="every entry processed")
        sources = [s for s, _ in await echoed(bus)]
        assert sorted(sources) == sorted(published)  # nothing lost, nothing twice
        assert proc.poll() is None
    finally:
        if proc is not None:
            assert stop_process(proc) == 0  # before its Redis goes away for good
        await bus.close()
        stop_process(server)


def _pings(url: str) -> bool:
    try:
        return sync_redis.Redis.from_url(url).ping()
    except sync_redis.ConnectionError:
        return False


async def _all_done(bus: Bus, published: list[str]) -> bool:
    return {s for s, _ in await echoed(bus)} >= set(published)


class CountingHandler:
    """In-process handler: records concurrency, logs through structlog, can pause reading."""

    def __init__(self):
        self.active = self.peak = 0
        self.is_ready = True
        self.closed = False

    async def handle(self, message: Prompt):
        structlog.get_logger().info("handling in the handler")
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.2)
        self.active -= 1
        return [Output("echoed", message)]

    async def ready(self) -> bool:
        return self.is_ready

    async def close(self) -> None:
        self.closed = True


async def test_in_process_worker_bounds_concurrency_pauses_and_tags_log_lines(bus, run_name, redis_url, capsys):
    config = make_config(run_name, redis_url, worker={"concurrency": 2, "heartbeat_s": 0.2},
                         bus={"block_ms": 50})
    handler = CountingHandler()
    handler.is_ready = False
    stop = asyncio.Event()

    async def build(ctx):
        return handler

    for i in range(6):
        await bus.publish("prompts", prompt(f"q{i}"))
    task = asyncio.create_task(run_worker(config, "echo", build, stream=PROMPTS, worker_id="inproc", stop=stop))
    await asyncio.sleep(1.0)
    assert await echoed(bus) == [] and await pending_ids(bus) == []  # not ready: nothing read
    handler.is_ready = True
    await wait_for(lambda: _count_is(echoed(bus), 6), timeout=10, what="six outputs")
    assert await bus.redis.exists(bus.key("heartbeat:echo:inproc"))
    stop.set()
    await asyncio.wait_for(task, 10)
    assert handler.peak == 2 and handler.closed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    handling = [line for line in lines if line["event"] == "handling in the handler"]
    assert len(handling) == 6
    assert {(line["role"], line["worker"]) for line in handling} == {("echo", "inproc")}
    assert sorted(line["prompt_id"] for line in handling) == [f"q{i}" for i in range(6)]


class KeyRefusedHandler:
    """Every message meets an engine that refuses our key."""

    async def handle(self, message):
        from catq.engines.client import EngineAuthError

        raise EngineAuthError("http://engine", 401, "Unauthorized")


async def test_configuration_error_stops_the_worker_and_dead_letters_nothing(bus, run_name, redis_url):
    """A wrong or missing engine key is no property of the prompt: the worker stops with the
    configuration error, the entry stays pending for a worker that has the key."""
    from catq.config import ConfigError

    config = make_config(run_name, redis_url, worker={"heartbeat_s": 0.2}, bus={"block_ms": 50})
    await bus.publish("prompts", prompt("q0"))

    async def build(ctx):
        return KeyRefusedHandler()

    with pytest.raises(ConfigError, match="HTTP 401"):
        await asyncio.wait_for(run_worker(config, "echo", build, stream=PROMPTS, worker_id="keyless",
                                          stop=asyncio.Event()), 20)
    assert len(await pending_ids(bus)) == 1
    assert await bus.redis.xlen(bus.key("dead")) == 0

"""`catq up`: run a whole catq stack on one machine as supervised child processes.

Order of start: Redis (only if none answers at the configured URL), the engines the config
launches (each waits for /health), then every role with its configured number of copies. Every
child's output is prefixed with its name (``[rollout.0] ...``). A child that dies is reported
and restarted, up to a limit. Stop (Ctrl-C / SIGTERM) runs in the reverse order of the data flow:
ingest first (no new work), then rollout → anchor → judge → learner → syncer, each given the
worker grace period to finish or leave its entries pending, then the engines, then Redis. Since
workers ack only after their output is written, this loses no acknowledged work.

Children run in their own sessions so a terminal's Ctrl-C reaches only this supervisor, which
then stops them in order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import redis.asyncio as aioredis

from catq.config import Config, EngineSpec

ROLE_STOP_ORDER = ("ingest", "rollout", "anchor", "judge", "learner", "syncer")


class LaunchError(RuntimeError):
    """The stack could not be brought up (missing Redis binary, an engine never got healthy...)."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    max_restarts: int = 3
    restarts: int = 0
    process: asyncio.subprocess.Process | None = None
    pump: asyncio.Task | None = None
    stopping: bool = False
    exit_codes: list[int] = field(default_factory=list)
    """Exit codes of incarnations that died on their own, oldest first."""
    given_up: bool = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Stack:
    """The supervised processes of one run. Use ``async with Stack(config, path) as stack``."""

    def __init__(self, config: Config, config_path: str | None, *, out=None,
                 health_timeout_s: float = 600.0, max_restarts: int = 3):
        self.config = config
        self.config_path = config_path
        self.out = out or sys.stdout
        self.health_timeout_s = health_timeout_s
        self.max_restarts = max_restarts
        self.redis_child: Child | None = None
        self.engines: list[Child] = []
        self.roles: dict[str, list[Child]] = {}
        self._supervisor: asyncio.Task | None = None
        self.log_lines: asyncio.Queue[str] | None = None

    # ---- start -------------------------------------------------------------------------

    async def start(self) -> None:
        self.config.run_path.mkdir(parents=True, exist_ok=True)
        await self._ensure_redis()
        await self._start_engines()
        self._supervisor = asyncio.create_task(self._supervise())
        await self._start_roles()
        await self.wait_roles_healthy()

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _ensure_redis(self) -> None:
        if await redis_answers(self.config.redis_url):
            return
        url = urlparse(self.config.redis_url)
        if url.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise LaunchError(f"no Redis answers at {self.config.redis_url} and it is not local")
        binary = shutil.which("redis-server")
        if binary is None:
            raise LaunchError(
                "no Redis answers at %s and redis-server is not on PATH: install it "
                "(Debian/Ubuntu: apt-get install redis-server) or point CATQ_REDIS_URL at one"
                % self.config.redis_url
            )
        data_dir = self.config.run_path / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(url.port or 6379), "--bind", url.hostname,
                "--appendonly", "yes", "--dir", str(data_dir.resolve()), "--save", ""]
        self.redis_child = Child("redis", argv, dict(os.environ), max_restarts=0)
        await self._spawn(self.redis_child)
        await wait_until(lambda: redis_answers(self.config.redis_url), 30.0, "redis-server")

    async def _start_engines(self) -> None:
        for spec in self.config.engines.launch:
            if spec.kind == "external":
                continue
            child = Child(f"engine.{spec.name}", self._engine_argv(spec), self._engine_env(spec),
                          max_restarts=self.max_restarts)
            self.engines.append(child)
            await self._spawn(child)
        for spec in self.config.engines.launch:
            await wait_until(lambda s=spec: engine_healthy(s.url), self.health_timeout_s,
                             f"engine {spec.name} at {spec.url}", self._engine_died)

    def _engine_env(self, spec: EngineSpec) -> dict[str, str]:
        env = self._child_env()
        if spec.kind == "sglang":
            # Behaviour log-probs of the raw distribution (no temperature), as the learner computes.
            env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        return env

    def _engine_argv(self, spec: EngineSpec) -> list[str]:
        if spec.kind == "sglang":
            return [sys.executable, "-m", "sglang.launch_server", "--model-path", spec.model,
                    "--host", spec.host, "--port", str(spec.port)]
        argv = [sys.executable, "-m", "catq", "engine", "--model", spec.model,
                "--host", spec.host, "--port", str(spec.port)]
        if spec.policy:
            self.config.weights_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--weights-dir", str(self.config.weights_dir.resolve())]
        return argv

    async def _start_roles(self) -> None:
        for role in ROLE_STOP_ORDER:
            copies = getattr(self.config.roles, role)
            self.roles[role] = [
                Child(f"{role}.{i}", self._role_argv(role), self._child_env(),
                      max_restarts=self.max_restarts)
                for i in range(copies)
            ]
            for child in self.roles[role]:
                await self._spawn(child)

    def _role_argv(self, role: str) -> list[str]:
        argv = [sys.executable, "-m", "catq", "worker", role]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        return argv

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CATQ_RUN"] = self.config.run
        env["CATQ_REDIS_URL"] = self.config.redis_url
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def wait_roles_healthy(self) -> None:
        for role, children in self.roles.items():
            if role in ("ingest",) or not children:
                continue  # ingest is an HTTP server; it is checked on /healthz below
            await wait_until(lambda r=role, n=len(children): has_live_workers(self.config, r, n),
                             self.health_timeout_s, f"{role} heartbeat", self._role_died)
        if self.roles.get("ingest"):
            url = f"http://{self.config.ingest.host}:{self.config.ingest.port}/healthz"
            await wait_until(lambda: http_ok(url), self.health_timeout_s, "ingest", self._role_died)

    def _engine_died(self) -> str | None:
        return next((f"{c.name} exited with {c.process.returncode}" for c in self.engines
                     if c.process and c.process.returncode is not None), None)

    def _role_died(self) -> str | None:
        return next((f"{c.name} kept dying (exit codes {c.exit_codes})"
                     for cs in self.roles.values() for c in cs if c.given_up), None)

    # ---- run ---------------------------------------------------------------------------

    async def _spawn(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(
            *child.argv, env=child.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        child.pump = asyncio.create_task(self._pump(child))

    async def _pump(self, child: Child) -> None:
        assert child.process and child.process.stdout
        async for raw in child.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.out.write(f"[{child.name}] {line}\n")
            self.out.flush()

    async def _supervise(self) -> None:
        """Restart children that die on their own, up to their limit."""
        while True:
            await asyncio.sleep(0.5)
            for child in self.children():
                if child.stopping or child.running or child.process is None:
                    continue
                await self._restart_or_report(child)

    async def _restart_or_report(self, child: Child) -> None:
        if child.given_up:
            return
        code = child.process.returncode
        child.exit_codes.append(code)
        if child.restarts >= child.max_restarts:
            child.given_up = True
            self._say(f"{child.name} exited with {code}; restart limit reached, not restarting")
            return
        child.restarts += 1
        self._say(f"{child.name} exited with {code}; restarting ({child.restarts}/{child.max_restarts})")
        await self._spawn(child)

    def children(self) -> list[Child]:
        roles = [c for cs in self.roles.values() for c in cs]
        return roles + self.engines + ([self.redis_child] if self.redis_child else [])

    def _say(self, text: str) -> None:
        self.out.write(f"[catq up] {text}\n")
        self.out.flush()

    # ---- stop --------------------------------------------------------------------------

    async def stop(self) -> None:
        if self._supervisor:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        grace = self.config.worker.grace_period_s + 10.0
        for role in ROLE_STOP_ORDER:
            await asyncio.gather(*(stop_child(c, grace) for c in self.roles.get(role, [])))
        await asyncio.gather(*(stop_child(c, 30.0) for c in self.engines))
        if self.redis_child:
            await stop_child(self.redis_child, 30.0)
        pumps = [c.pump for c in self.children() if c.pump]
        await asyncio.gather(*pumps, return_exceptions=True)


async def stop_child(child: Child, grace_s: float) -> None:
    """SIGTERM, wait up to grace_s, then SIGKILL. Never leaves the process behind."""
    child.stopping = True
    proc = child.process
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def has_live_workers(config: Config, role: str, count: int) -> bool:
    from catq.ops import live_workers

    return len(await live_workers(config, role)) >= count


async def redis_answers(url: str) -> bool:
    client = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


async def http_ok(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            async with session.get(url) as response:
                return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def engine_healthy(base_url: str) -> bool:
    return await http_ok(f"{base_url}/health")


async def wait_until(check, timeout_s: float, what: str, failed=None) -> None:
    """Poll an async check until true; raise LaunchError on timeout or when ``failed()`` says why."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        reason = failed() if failed else None
        if reason:
            raise LaunchError(f"waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} not healthy after {timeout_s:.0f}s")
        await asyncio.sleep(0.5)


async def run_until_signalled(stack: Stack) -> None:
    """Bring the stack up and keep it until SIGINT/SIGTERM, which also cuts a slow start short."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(stack.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here
            stack._say(f"run {stack.config.run!r} is up; Ctrl-C stops it")
            await stopping
        stack._say("stopping")
    finally:
        for task in (starting, stopping):
            task.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        await stack.stop()
    stack._say("stopped")


def up_command(args, config: Config) -> int:
    try:
        asyncio.run(run_until_signalled(Stack(config, config_file_arg(args.config))))
    except LaunchError as exc:
        print(f"catq up: {exc}", file=sys.stderr)
        return 1
    return 0


def config_file_arg(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None

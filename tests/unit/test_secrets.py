"""Secrets stay out of logs and errors: URL passwords and tokens are redacted in every structlog
line and in error messages; a refused Redis login is not retried as a connection error."""

from __future__ import annotations

import json

import pytest
import structlog
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoPermissionError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from catq.bus import RedisAuthError, auth_error, is_auth_error, is_retryable
from catq.config import ConfigError
from catq.log import redact, setup_cli_logging, setup_logging


@pytest.mark.parametrize("text, expected", [
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://catq:s3cret@10.0.0.1", "redis://catq:***@10.0.0.1"),
    ("rediss://:p:a:ss@h and redis://h2:6379", "rediss://:***@h and redis://h2:6379"),
    ("Authorization: Bearer abc.def-123", "Authorization: Bearer ***"),
    ("http://127.0.0.1:30000/health", "http://127.0.0.1:30000/health"),
    ("max_new_tokens=24", "max_new_tokens=24"),
    ("ServerArgs(model_path='/m', api_key='sk-1', admin_api_key=None, port=1)",
     "ServerArgs(model_path='/m', api_key='***', admin_api_key=None, port=1)"),
    ('{"token": "t0k", "token_ids": [1, 2]}', '{"token": "***", "token_ids": [1, 2]}'),
    ("sglang --api-key k1 --admin-api-key=k2 --port 1", "sglang --api-key *** --admin-api-key=*** --port 1"),
])
def test_redact_masks_url_passwords_and_bearer_tokens(text, expected):
    assert redact(text) == expected


def test_worker_log_lines_carry_no_password_or_token(capsys):
    log = setup_logging("test", "w1")
    log.warning("redis unreachable", url="redis://:hunter2@redis:6379", api_key="sk-abc",
                admin_api_key="adm-xyz", token="tok-xyz", max_new_tokens=24, urls=["redis://:hunter2@x"])
    try:
        raise RuntimeError("connect to redis://:hunter2@redis failed")
    except RuntimeError:
        log.exception("boom")
    out = capsys.readouterr().out
    for secret in ("hunter2", "sk-abc", "adm-xyz", "tok-xyz"):
        assert secret not in out
    first = json.loads(out.splitlines()[0])
    assert first["url"] == "redis://:***@redis:6379" and first["api_key"] == "***"
    assert first["max_new_tokens"] == 24


def test_cli_log_lines_carry_no_password(capsys):
    setup_cli_logging()
    structlog.get_logger().warning("redis unreachable, retrying", error="redis://:hunter2@h refused")
    err = capsys.readouterr().err
    assert "hunter2" not in err and "redis://:***@h" in err


@pytest.mark.parametrize("exc", [
    AuthenticationError("invalid username-password pair"),
    AuthorizationError("not allowed"),
    NoPermissionError("NOPERM this user has no permissions to run the 'xadd' command"),
    ResponseError("WRONGPASS invalid username-password pair or user is disabled."),
    ResponseError("NOAUTH Authentication required."),
])
def test_auth_errors_are_not_retryable(exc):
    assert is_auth_error(exc) and not is_retryable(exc)


@pytest.mark.parametrize("exc", [RedisConnectionError("refused"), BusyLoadingError("loading"),
                                 TimeoutError(), OSError("reset")])
def test_connection_errors_stay_retryable(exc):
    assert is_retryable(exc) and not is_auth_error(exc)


def test_a_refused_login_is_a_config_error_naming_the_url_without_its_password():
    error = auth_error("redis://:hunter2@redis:6379", AuthenticationError("invalid password"))
    assert isinstance(error, RedisAuthError) and isinstance(error, ConfigError)
    assert "hunter2" not in str(error) and "redis://:***@redis:6379" in str(error)
    assert "\n" not in str(error)


def test_children_of_up_get_the_allowlist_and_the_configs_key_variables_only():
    from catq.child_env import child_environment
    from catq.config import load_config

    config = load_config(None, run="unit")
    config.ingest.token_env = "MY_INGEST_TOKEN"
    config.engines.judge_api_key_env = "JUDGE_KEY"
    parent = {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C.UTF-8", "PYTHONPATH": "/src",
              "CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/hf", "OMP_NUM_THREADS": "1",
              "CATQ_ENGINE_API_KEY": "k", "MY_INGEST_TOKEN": "t", "JUDGE_KEY": "j",
              "AWS_SECRET_ACCESS_KEY": "aws", "GITHUB_TOKEN": "gh", "OPENAI_API_KEY": "unused",
              "DATABASE_URL": "postgres://u:p@db"}
    env = child_environment(config, parent)
    assert set(env) == {"PATH", "HOME", "LC_ALL", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "HF_HOME",
                        "OMP_NUM_THREADS", "CATQ_ENGINE_API_KEY", "MY_INGEST_TOKEN", "JUDGE_KEY"}


def test_stack_children_env_has_no_unrelated_secret(monkeypatch, tmp_path):
    from catq.config import EngineSpec, load_config
    from catq.launcher import Stack

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("CATQ_ENGINE_API_KEY", "engine-key")
    config = load_config(None, run="unit", redis_url="redis://:pw@127.0.0.1:6399")
    stack = Stack(config, None)
    spec = EngineSpec(name="policy", device="cpu")
    for env in (stack._child_env(threads=1), stack._engine_env(spec)):
        assert "AWS_SECRET_ACCESS_KEY" not in env
        assert env["CATQ_REDIS_URL"] == "redis://:pw@127.0.0.1:6399" and env["CATQ_RUN"] == "unit"
    assert stack._engine_env(spec)["CATQ_ENGINE_API_KEY"] == "engine-key"


def test_the_run_dirs_redis_password_is_random_private_and_reused(tmp_path):
    import stat

    from catq.child_env import run_redis_password

    first = run_redis_password(tmp_path)
    assert len(first) >= 32 and first == run_redis_password(tmp_path)
    assert stat.S_IMODE((tmp_path / "redis.password").stat().st_mode) == 0o600
    other = tmp_path / "other"
    other.mkdir()
    assert run_redis_password(other) != first


def test_with_password_and_the_redis_conf_keep_the_password_out_of_argv(tmp_path):
    import stat

    from catq.child_env import with_password, write_redis_conf

    assert with_password("redis://127.0.0.1:6380/0", "a/b@c") == "redis://:a%2Fb%40c@127.0.0.1:6380/0"
    assert with_password("redis://me:old@h:1", "new") == "redis://me:new@h:1"
    conf = tmp_path / "redis.conf"
    write_redis_conf(conf, 'p"q')
    assert conf.read_text() == 'requirepass "p\\"q"\n'
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600


def test_prose_about_tokens_is_not_mistaken_for_a_secret():
    from catq.log import redact

    line = "refusing to listen on '0.0.0.0' without a token: set $CATQ_INGEST_TOKEN"
    assert redact(line) == line
    assert redact('{"token": "abc"}') == '{"token": "***"}'

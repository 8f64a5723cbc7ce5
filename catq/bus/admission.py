"""What ingest asks Redis before it admits a request: the backlog of a consumer group (admission
control, ``ingest.max_backlog``) and a client's token bucket (the rate limit, shared by every
ingest replica because it lives in Redis: ``lua/rate_limit.lua``)."""

from __future__ import annotations

from catq.bus.connection import Connection
from catq.bus.entries import as_str
from catq.bus.scripts import lua


class Admission(Connection):
    """Backlog reads and per-client token buckets."""

    def _init_admission(self) -> None:
        self._rate_limit = self.redis.register_script(lua("rate_limit"))

    async def backlog(self, stream: str, group: str, cap: int) -> int:
        """Entries of ``stream`` that ``group`` has not finished: pending (delivered, not acked)
        plus lag (not yet delivered); every entry while the group does not exist yet. Where Redis
        cannot tell the lag (entries were deleted), the entries after the group's last delivered
        id are counted, up to ``cap`` (a caller only needs to know it is over its limit)."""
        key = self.key(stream)

        async def read() -> tuple[int, list]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xlen(key)
            pipe.xinfo_groups(key)
            length, groups = await pipe.execute(raise_on_error=False)
            return int(length), groups if isinstance(groups, list) else []  # no stream: an error

        length, groups = await self.retrying(read, f"backlog {stream}")
        found = next((g for g in groups if as_str(g["name"]) == group), None)
        if found is None:
            return length
        lag = found.get("lag")
        if lag is None:
            after = "(" + as_str(found["last-delivered-id"])
            lag = len(await self.retrying(lambda: self.redis.xrange(key, min=after, count=cap), f"backlog {stream}"))
        return int(found["pending"]) + int(lag)

    async def take_token(self, client: str, per_s: float, burst: int) -> float:
        """Take one request from ``client``'s token bucket (``burst`` at once, refilled at
        ``per_s`` a second, on Redis's clock): 0.0 if allowed, else the seconds until it is. The
        bucket expires once it would be full again, so idle clients cost nothing."""
        wait = await self.retrying(
            lambda: self._rate_limit(keys=[self.key(f"ratelimit:{client}")], args=[per_s, burst]),
            "rate limit")
        return float(as_str(wait))

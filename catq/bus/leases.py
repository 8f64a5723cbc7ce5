"""The learner lease: one holder of a named lease at a time (SET NX PX), and a fencing token
(INCR) per acquisition. A holder whose token is no longer the newest may not publish, even if
it has not noticed yet that its lease expired and was taken (:meth:`Leases.publish_policy_version`)."""

from __future__ import annotations

from catq.bus.entries import as_str
from catq.bus.scripts import lua
from catq.bus.streams import Streams
from catq.messages import Message, encode
from catq.topology import WEIGHTS


class LeaseLost(Exception):
    """This holder's fencing token is no longer current: another holder took the lease."""


class Leases(Streams):
    def _init_leases(self) -> None:
        self._lease_acquire = self.redis.register_script(lua("lease_acquire"))
        self._lease_renew = self.redis.register_script(lua("lease_renew"))
        self._lease_release = self.redis.register_script(lua("lease_release"))
        self._fenced_publish = self.redis.register_script(lua("fenced_publish"))

    async def acquire_lease(self, name: str, holder: str, ttl_ms: int) -> int:
        """Take the lease if nobody holds it: returns the new fencing token, or 0 when held."""
        token = await self.retrying(
            lambda: self._lease_acquire(keys=self.lease_keys(name), args=[holder, ttl_ms]),
            f"acquire lease {name}")
        return int(token)

    async def renew_lease(self, name: str, token: int, holder: str, ttl_ms: int) -> bool:
        """Extend the lease while ``token`` is still the newest (also after a lapse nobody used);
        False once another holder has taken it."""
        renewed = await self.retrying(
            lambda: self._lease_renew(keys=self.lease_keys(name), args=[token, holder, ttl_ms]),
            f"renew lease {name}")
        return bool(renewed)

    async def release_lease(self, name: str, token: int) -> bool:
        """Drop the lease at a clean stop if ``token`` still holds it, so a successor need not
        wait for it to expire."""
        released = await self.retrying(
            lambda: self._lease_release(keys=self.lease_keys(name), args=[token]), f"release lease {name}")
        return bool(released)

    async def lease_holder(self, name: str) -> str | None:
        value = await self.retrying(lambda: self.redis.get(self.lease_keys(name)[0]), f"lease holder {name}")
        return as_str(value) if value is not None else None

    async def holds_lease(self, name: str, token: int) -> bool:
        """Whether ``token`` is still the lease's newest fencing token."""
        current = await self.retrying(lambda: self.redis.get(self.lease_keys(name)[1]), f"check lease {name}")
        return current is not None and int(current) == int(token)

    async def publish_policy_version(self, lease: str, token: int, version: int,
                                     message: Message | None = None) -> str | None:
        """Fenced, in one atomic step: XADD ``message`` (a WeightsPublished; None: none) on
        ``weights`` and set the run's policy version, only while ``token`` is the newest of
        ``lease``; else raise :class:`LeaseLost` with nothing written. Returns the entry id."""
        keys = [self.lease_keys(lease)[1], self.key(WEIGHTS.name), self.key("policy_version")]
        args = [token, int(version), encode(message) if message is not None else b""]
        entry_id = await self.retrying(lambda: self._fenced_publish(keys=keys, args=args),
                                       "publish policy version")
        if entry_id is None:
            raise LeaseLost(f"lease {lease!r}: fencing token {token} is no longer current "
                            f"(another holder took the lease); version {version} not published")
        if message is not None:
            await self._maybe_trim(WEIGHTS.name)
        return as_str(entry_id) or None

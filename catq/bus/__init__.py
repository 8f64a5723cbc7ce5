"""The one package that talks to Redis: the stream protocol (XADD, XREADGROUP, XACK,
XAUTOCLAIM, ...), and the plain keys beside it (heartbeats, per-prompt result hashes, restart
counts, the policy version, the learner's lease and fencing token, trained prompt/version
pairs). No other module calls Redis; everything else goes through :class:`Bus`.

What lives where (one :class:`Bus` is built from these parts, each a mixin over one Redis client):

==================  ===========================================================================
``keys.py``         the key layout: every key of a run is ``catq:{<run>}:<name>`` (:func:`run_key`)
``connection.py``   the client, the retry loop and its predicates (retryable, auth refused)
``entries.py``      an entry's id (:class:`EntryId`, the one place ids are parsed), its fields,
                    :func:`prompt_of`, and :class:`Delivery` / :class:`Output` / :class:`KeyedEntry`
``streams.py``      writing: publish, publish_once, complete, ack, failures, dead letters, trim
``groups.py``       consuming through a group: reads, reclaiming, screening, keep-alive
``inspect.py``      reading without a group, traces, stats (:class:`GroupStats`), ``catq dead``'s
                    list/replay/drop, key migration
``records.py``      result hashes, restart counts, policy version, trained pairs
``liveness.py``     heartbeats, per-role work counters, engine replicas
``leases.py``       the learner lease and the fenced policy-version publish
``admission.py``    what ingest asks before admitting: a group's backlog, a client's token bucket
``lua/*.lua``       the scripts, one a file, each with a KEYS/ARGV header (``scripts.py`` loads them)
``stream_bus.py``   :class:`StreamBus`, what a stream role's worker loop needs of a transport
==================  ===========================================================================

Who may import it: any module of ``catq``, ``workers``, ``bench`` and the tests import names from
``catq.bus`` (this file), never from its modules (only the package's own test reaches into
``scripts``); inside the package, modules import each other downward (keys → connection →
streams → groups/inspect/records/liveness/leases). Nothing here imports a role, the runtime or
an operator command.

Roles see as little as they need: the worker loop of the stream roles
(:class:`catq.runtime._WorkerLoop`) takes a :class:`StreamBus`, seven methods. Replacing Redis
streams by another transport means implementing :class:`StreamBus` for the stream roles (and
the rest of :class:`Bus` for ingest, learner, syncer and the operator commands).

Delivery is at least once, processed effectively once: see :mod:`catq.bus.streams` (writing,
completing atomically, trimming) and :mod:`catq.bus.groups` (group reads, reclaiming, dead
letters); Redis errors are retried as :mod:`catq.bus.connection` says.
"""

from __future__ import annotations

from catq.bus.admission import Admission
from catq.bus.connection import (
    AUTH_ERROR_CODES,
    SOCKET_TIMEOUT_S,
    RedisAuthError,
    auth_error,
    is_auth_error,
    is_out_of_memory,
    is_retryable,
    redis_answers,
    redis_state,
)
from catq.bus.entries import (
    MESSAGE_FIELD,
    SOURCE_FIELD,
    Delivery,
    EntryId,
    KeyedEntry,
    Output,
    PublishedOnce,
    prompt_of,
)
from catq.bus.groups import MAX_BLOCK_MS, GroupReads
from catq.bus.inspect import ConsumerStats, GroupStats, Inspection, RedisMemory, StreamStats
from catq.bus.keys import legacy_run_key, run_key
from catq.bus.leases import Leases, LeaseLost
from catq.bus.liveness import LATENCY_SAMPLES, Liveness
from catq.bus.records import Records
from catq.bus.stream_bus import StreamBus
from catq.config import BusConfig

__all__ = [
    "AUTH_ERROR_CODES", "LATENCY_SAMPLES", "MAX_BLOCK_MS", "MESSAGE_FIELD", "SOCKET_TIMEOUT_S",
    "SOURCE_FIELD", "Bus", "ConsumerStats", "Delivery", "EntryId", "GroupStats", "KeyedEntry",
    "LeaseLost", "Output", "PublishedOnce", "RedisAuthError", "RedisMemory", "StreamBus",
    "StreamStats", "auth_error", "is_auth_error", "is_out_of_memory", "is_retryable",
    "legacy_run_key", "prompt_of", "redis_answers", "redis_state", "run_key",
]


class Bus(GroupReads, Inspection, Records, Liveness, Leases, Admission):
    """Streams of one run. Safe to share between the tasks of one event loop."""

    def __init__(
        self,
        redis_url: str,
        run: str,
        config: BusConfig | None = None,
        *,
        reconnect_timeout_s: float | None = None,
        trim_interval_s: float = 1.0,
    ):
        super().__init__(redis_url, run, config, reconnect_timeout_s=reconnect_timeout_s)
        self._init_streams(trim_interval_s)
        self._init_groups()
        self._init_inspection()
        self._init_leases()
        self._init_admission()

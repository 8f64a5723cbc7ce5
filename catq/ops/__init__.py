"""The operator commands of the ``catq`` CLI: what a person runs to feed, watch and repair a run.

    submit.py    `catq submit`     enqueue prompts (TEXT or --file), optionally --wait for them
    tail.py      `catq tail`       a stream's entries, newest or --since, then follow
    status.py    `catq status`     streams, groups, role liveness, starved stages, dead letters
    health.py    `catq health`     liveness per role and stalled stages (also what `catq up` watches)
    top.py       `catq top`        the run watched live: throughput, latency, learner, engines
    trace.py     `catq trace`      one prompt's path through every stream
    dead.py      `catq dead`       dead letters: list, replay, drop
    migrate.py   `catq migrate-keys`  a run from before hash-tagged keys carried over
    readable.py  messages as a person reads them (`catq tail`, `catq trace`)
    common.py    the CLI's Bus (fails fast on an unreachable Redis), one-line errors, exit codes

Each command is ``(args, config) -> exit code``; catq/cli.py holds the flags and names each
handler by ``"catq.ops.<module>:<function>"``. They talk to Redis through :class:`catq.bus.Bus`
and fail fast (a few seconds) when Redis is unreachable (exit 1), at once when it refuses the
URL's password (exit 2). Error lines never show a URL's password (:func:`catq.log.redact`).

Imports: ops may import the bus, config, messages, results, topology, log and ingest (what
`catq submit` parses and enqueues with). It is imported by catq/cli.py (by name) and by the
launcher (`catq up` supervises with :mod:`catq.ops.health`); roles and the library (bus,
messages, teacher, learner, engines, roles) must not import ops.
"""

"""The learner: GRPO on scored groups (grpo), checkpoints for exactly-once training
(checkpoint), atomic weight publishing (publish), the learner lease (lease), and the learner
process, split by concern: the loop (worker: :class:`~catq.learner.worker.LearnerLoop`), what
enters its batch buffer (intake), the checkpoint -> ack -> announce pipeline (commit), the
metrics lines (metrics_log), the Protocols its fields are typed with (protocols), the training
side (trainer) and its multi-GPU form (distributed: FSDP2; leader: rank 0 leads, the others
follow). Also the weight syncer that keeps policy engines on the newest version (syncer).

The roles' wiring (``run``) is in :mod:`catq.roles`. Who may import it: :mod:`catq.roles`,
tests and benchmarks; inside the package modules import downward (protocols/intake ->
metrics_log/commit -> worker; distributed -> trainer -> leader). Nothing here imports
``workers``.
"""

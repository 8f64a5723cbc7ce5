"""The learner: GRPO on scored groups (grpo), checkpoints for exactly-once training
(checkpoint), atomic weight publishing (publish), the learner lease (lease), and the learner
process, split by concern: the loop (worker: :class:`~catq.learner.worker.LearnerLoop`), what
enters its batch buffer (intake), the checkpoint -> ack -> announce pipeline (commit), the
metrics lines (metrics_log), the Protocols its fields are typed with (protocols), the role's
wiring (role: lease, torchrun ranks, ``run``), the training side (trainer) and its multi-GPU
form (distributed: FSDP2; leader: rank 0 leads, the others follow). Also the weight syncer that
keeps policy engines on the newest version (syncer).

Who may import it: the roles' entry points and tests import from here; inside the package
modules import downward (protocols/intake -> metrics_log/commit -> worker -> role; distributed ->
trainer -> leader). Nothing here imports ``workers``.
"""

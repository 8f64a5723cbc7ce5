"""The learner: GRPO on scored groups (grpo), checkpoints for exactly-once training
(checkpoint), atomic weight publishing (publish), the learner process (worker) and the weight
syncer that keeps policy engines on the newest version (syncer)."""

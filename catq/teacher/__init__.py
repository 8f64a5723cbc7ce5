"""The teacher: rollout, anchor and judge (DESIGN §1, steps 1-3).

Pure logic, testable without Redis or a model: answers (final-answer extraction and
equivalence), prompts (every prompt the teacher sends), estimators (the reference s), rubric
(self-proposed rubric XML), judging (rewards). The role modules rollout, anchor and judge wire
that logic to the bus and the engines; each exposes ``async def run(config)``.
"""

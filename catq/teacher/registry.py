"""The reference estimators by name: the one list that config validation, ``catq eval``'s
default, the evaluation plots and the anchor role read (DESIGN §1.2).

Adding an estimator is its module (an ``async def estimate(group, *, anchor, policy, question,
options) -> Reference``, see :mod:`catq.teacher.estimators`) plus one line here. Each entry names
its function as ``"module:function"`` and is imported only when used: this module imports
nothing, so the config can validate a name without loading math-verify and sympy.
:func:`register` / :func:`unregister` add and remove one at run time (a plugin, or the example
estimator of tests/unit/test_estimator_registry.py); everything reads the dict when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Estimator:
    name: str
    target: str
    """The estimate function, ``"module:function"``."""
    needs_policy: bool = False
    """It asks the policy engine (self best-of-N), not only the anchor."""
    tasks: tuple[str, ...] = ("math", "open")
    """Tasks it serves; a prompt of another task is estimated by synthesis instead."""

    def load(self):
        module, _, function = self.target.partition(":")
        return getattr(import_module(module), function)


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("synthesis", "catq.teacher.estimators:synthesis_estimate"),
    Estimator("majority", "catq.teacher.estimators:majority_estimate", tasks=("math",)),
    Estimator("self_bon", "catq.teacher.estimators:self_bon_estimate", needs_policy=True),
    Estimator("min_ppl", "catq.teacher.estimators:min_ppl_estimate"),
    Estimator("mutual_predictability", "catq.teacher.mutual_predictability:estimate"),
)}
"""Every estimator, in the order tables and plots show them."""

FALLBACK = "synthesis"
"""What a prompt gets from an estimator that does not serve its task."""


def register(entry: Estimator) -> Estimator:
    """Add ``entry`` to :data:`ESTIMATORS` (last in order); ValueError if its name is taken.
    catq's own estimators are the lines above; this is for a plugin or a test's example."""
    if entry.name in ESTIMATORS:
        raise ValueError(f"estimator {entry.name!r} is already registered")
    ESTIMATORS[entry.name] = entry
    return entry


def unregister(name: str) -> Estimator:
    """Remove the registered estimator ``name`` (undoes :func:`register`)."""
    return ESTIMATORS.pop(estimator(name).name)


def serving(task: str) -> list[str]:
    """The estimators that serve prompts of ``task``, in registry order."""
    return [name for name, entry in ESTIMATORS.items() if task in entry.tasks]


def estimator(name: str) -> Estimator:
    """The registered estimator ``name``; ValueError naming the known ones otherwise."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}") from None


def needs_policy(names) -> bool:
    """Whether any of the named estimators asks the policy engine."""
    return any(estimator(n).needs_policy for n in names)

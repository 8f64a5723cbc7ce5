"""Adding an estimator is its module plus one registry line: config validation, `catq eval`'s
--estimators (its default and its check) and the plots all read catq.teacher.registry.ESTIMATORS.

The example estimator is registered through the registry's API for one test and removed after.
"""

from __future__ import annotations

import pytest

from catq.cli import build_parser
from catq.config import ConfigError, load_config
from catq.evaluation.command import EvalError, parse_estimators
from catq.teacher import registry
from catq.teacher.estimators import Reference

NAME = "first_rollout"


async def first_rollout_estimate(group, *, anchor, policy, question, options) -> Reference:
    """A trivial estimator: the group's first rollout is the reference."""
    return Reference(group.rollouts[0].text, NAME, "", False)


@pytest.fixture
def example_estimator():
    entry = registry.register(registry.Estimator(NAME, f"{__name__}:first_rollout_estimate"))
    try:
        yield entry
    finally:
        registry.unregister(NAME)
    assert NAME not in registry.ESTIMATORS


def anchor_config(tmp_path, estimator: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(f'[anchor]\nestimator = "{estimator}"\n')
    return str(path)


def test_an_unregistered_estimator_is_refused_everywhere(tmp_path):
    with pytest.raises(ConfigError, match="unknown estimator"):
        load_config(anchor_config(tmp_path, NAME))
    with pytest.raises(EvalError, match="known"):
        parse_estimators(NAME)
    assert NAME not in build_parser().parse_args(["eval"]).estimators.split(",")


def test_a_registered_estimator_is_accepted_by_config_and_eval(example_estimator, tmp_path):
    assert example_estimator.load() is first_rollout_estimate
    config = load_config(anchor_config(tmp_path, NAME))
    assert config.anchor.estimator == NAME
    assert not registry.needs_policy([NAME])
    args = build_parser().parse_args(["eval"])  # the default is every registered estimator
    assert parse_estimators(args.estimators)[-1] == NAME
    assert parse_estimators(f"synthesis,{NAME}") == ["synthesis", NAME]
    assert parse_estimators(NAME, rubric=True) == [NAME]  # it serves open prompts too
    from catq.evaluation.plots import _series_names

    by_g = [{"estimators": {NAME: {}, "synthesis": {}}}]
    assert _series_names([{"by_g": by_g}]) == ["single", "synthesis", NAME, "pass_at_g"]


def test_a_name_is_registered_once(example_estimator):
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Estimator(NAME, "x:y"))


def test_rubric_scoring_keeps_the_estimators_that_serve_open_prompts():
    assert parse_estimators("synthesis,majority,min_ppl", rubric=True) == ["synthesis", "min_ppl"]
    with pytest.raises(EvalError, match="majority needs final answers; rubric-scored prompts take "
                                        "synthesis, self_bon, min_ppl or mutual_predictability"):
        parse_estimators("majority", rubric=True)

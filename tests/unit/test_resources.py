"""[resources]: `catq up` shares the cores out so engines and the learner do not oversubscribe."""

from catq.child_env import thread_env, thread_plan
from catq.config import EngineSpec, load_config


def config_with(engines: int, **resources):
    config = load_config(None)
    config.engines.launch = [EngineSpec(name=f"e{i}", port=30000 + i) for i in range(engines)]
    config.resources = config.resources.model_copy(update=resources)
    return config


def test_learner_gets_half_the_cores_and_the_engines_share_the_rest():
    plan = thread_plan(config_with(2), cores=16)
    assert (plan.learner, plan.engine, plan.role) == (8, 4, 1)
    assert plan.for_role("learner") == 8 and plan.for_role("judge") == 1


def test_on_a_small_machine_every_torch_process_gets_every_core():
    """Under two cores per torch process a share would be one thread (measured slower)."""
    for cores in (2, 6):
        plan = thread_plan(config_with(2), cores=cores)
        assert (plan.learner, plan.engine, plan.role) == (cores, cores, 1)
    plan = thread_plan(config_with(2), cores=8)
    assert (plan.learner, plan.engine) == (4, 2)


def test_explicit_settings_win_and_external_engines_take_no_share():
    config = config_with(1, cores=8, learner_threads=2)
    config.engines.launch.append(EngineSpec(name="far", port=31000, kind="external"))
    assert thread_plan(config, cores=64).engine == 6
    assert thread_env(3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_disabled_allocation_sets_no_thread_count(monkeypatch):
    from catq.launcher import Stack

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    allocated = Stack(config_with(1), None)
    assert allocated._child_env(3)["OMP_NUM_THREADS"] == "3"
    unallocated = Stack(config_with(1, enabled=False), None)
    env = unallocated._child_env(3)
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the environment's own setting is kept
    assert unallocated._child_env(3)["OMP_NUM_THREADS"] == "5"

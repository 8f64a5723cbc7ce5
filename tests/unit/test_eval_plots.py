"""PNG plots of ``catq eval`` (catq.evaluation.plots) on hand-made results and metrics.

Each PNG is read back and checked for its pixel size and for being more than a blank canvas.
"""

import math

import numpy as np
import pytest
from matplotlib import image as mpimg

from catq.evaluation.plots import (
    DPI,
    FIGSIZE,
    TRAINING_FIGSIZE,
    plot_accuracy_by_estimator,
    plot_all,
    plot_scaling,
    plot_training,
)

ALL_ESTIMATORS = ("synthesis", "majority", "self_bon", "min_ppl")


def interval(value, n=40, half_width=0.08):
    return {"value": value, "low": max(value - half_width, 0.0),
            "high": min(value + half_width, 1.0), "n": n}


def estimator_entry(accuracy):
    return {"accuracy": interval(accuracy), "present": interval(0.9),
            "agree_majority": interval(0.7), "signal": interval(0.5), "reward_mean": accuracy}


def make_version(label, step, estimators, base, group_sizes=(1, 2, 4, 8)):
    by_g = []
    for g in group_sizes:
        lift = 0.05 * np.log2(g)
        by_g.append({
            "g": g,
            "single": interval(base),
            "pass_at_g": interval(min(base + 3 * lift, 1.0)),
            "estimators": {name: estimator_entry(base + lift + 0.02 * index)
                           for index, name in enumerate(estimators)},
        })
    return {"label": label, "policy_version": int(label[1:]), "step": step, "by_g": by_g}


@pytest.fixture
def two_versions():
    return [make_version("v0", 0, ALL_ESTIMATORS, 0.40),
            make_version("v3", 30, ALL_ESTIMATORS, 0.55)]


@pytest.fixture
def one_version():
    return [make_version("v1", None, ("majority", "min_ppl"), 0.5)]


def metrics_lines(count=20, new_keys=True):
    lines = []
    for step in range(1, count + 1):
        line = {"step": step, "reward_mean": 0.3 + 0.01 * step, "kl": 0.001 * step,
                "clip_frac": 0.02, "policy_version": step // 5, "elapsed_s": 3.0 * step}
        if new_keys:
            line.update(signal_frac=0.6, reference_present_frac=0.95)
        lines.append(line)
    return lines


def assert_real_png(path, figsize):
    """Right pixel size, and drawn on: many non-white pixels in more than a few colours."""
    assert path.exists()
    pixels = mpimg.imread(path)
    height, width = pixels.shape[:2]
    assert abs(width - figsize[0] * DPI) <= 2
    assert abs(height - figsize[1] * DPI) <= 2
    rgb = pixels[..., :3]
    background = np.all(rgb > 0.99, axis=-1)
    assert (~background).mean() > 0.01
    channels = (rgb.reshape(-1, 3) * 255).astype(np.uint32)
    packed = channels[:, 0] << 16 | channels[:, 1] << 8 | channels[:, 2]  # 1-D unique is fast
    assert len(np.unique(packed)) > 8


def test_accuracy_by_estimator_two_versions(tmp_path, two_versions):
    path = plot_accuracy_by_estimator(two_versions, tmp_path / "bars.png")
    assert path == tmp_path / "bars.png"
    assert_real_png(path, FIGSIZE)


def test_accuracy_by_estimator_one_version_two_estimators(tmp_path, one_version):
    assert_real_png(plot_accuracy_by_estimator(one_version, tmp_path / "bars.png"), FIGSIZE)


def test_scaling_two_versions(tmp_path, two_versions):
    assert_real_png(plot_scaling(two_versions, tmp_path / "scaling.png"), FIGSIZE)


def test_scaling_one_version(tmp_path, one_version):
    assert_real_png(plot_scaling(one_version, tmp_path / "scaling.png"), FIGSIZE)


def test_empty_interval_draws_no_bar_and_no_error(tmp_path, one_version):
    """An estimator scored on no prompt has a nan interval (n = 0); the plots still render."""
    empty = {"value": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    for entry in one_version[0]["by_g"]:
        entry["estimators"]["majority"]["accuracy"] = empty
    assert_real_png(plot_accuracy_by_estimator(one_version, tmp_path / "bars.png"), FIGSIZE)
    assert_real_png(plot_scaling(one_version, tmp_path / "scaling.png"), FIGSIZE)


def test_training_with_version_accuracy(tmp_path):
    points = [{"step": 0, "label": "v0", "single": interval(0.4)},
              {"step": 20, "label": "v4", "single": interval(0.55)}]
    path = plot_training(metrics_lines(), tmp_path / "training.png", points)
    assert_real_png(path, TRAINING_FIGSIZE)


def test_training_on_old_metrics_without_new_keys(tmp_path):
    path = plot_training(metrics_lines(new_keys=False), tmp_path / "training.png")
    assert_real_png(path, TRAINING_FIGSIZE)


def test_training_with_keys_missing_from_some_lines(tmp_path):
    lines = metrics_lines()
    for line in lines[::2]:
        del line["kl"], line["signal_frac"]
    assert_real_png(plot_training(lines, tmp_path / "training.png"), TRAINING_FIGSIZE)


def test_training_without_lines_raises(tmp_path):
    with pytest.raises(ValueError, match="no learner steps in metrics.jsonl"):
        plot_training([], tmp_path / "training.png")
    assert not (tmp_path / "training.png").exists()


def test_plot_all_without_metrics(tmp_path, two_versions):
    paths = plot_all({"versions": two_versions}, tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy_by_estimator.png", "accuracy_vs_g.png"]
    for path in paths:
        assert_real_png(path, FIGSIZE)


def test_plot_all_with_metrics(tmp_path, two_versions):
    paths = plot_all({"versions": two_versions}, tmp_path, metrics=metrics_lines())
    assert [p.name for p in paths] == [
        "accuracy_by_estimator.png", "accuracy_vs_g.png", "training.png"]
    assert_real_png(paths[2], TRAINING_FIGSIZE)


def test_figures_are_closed(tmp_path, two_versions):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_all({"versions": two_versions}, tmp_path, metrics=metrics_lines())
    assert len(plt.get_fignums()) == before

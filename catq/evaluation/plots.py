"""PNG plots of ``catq eval``: accuracy per estimator, accuracy vs group size, training curves.

They take the plain dicts of ``results.json`` and the learner's ``metrics.jsonl``, so a plot can
be redrawn from saved files with no service running. An "interval" is
``{"value", "low", "high", "n"}`` (95%), drawn as an error bar or a shaded band.

Matplotlib runs on the "Agg" backend because evaluation runs headless (no display in a
container); every figure is closed after saving so a long-lived process does not leak them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

from catq.teacher.registry import ESTIMATORS

DPI = 120
FIGSIZE = (8.0, 5.0)
TRAINING_FIGSIZE = (8.0, 6.0)  # two stacked panels need more height than one
SCALING_WIDTH_PER_VERSION = 4.0  # below 8 in total the figure stays at FIGSIZE
ACCURACY_YLIM = (0.0, 1.05)  # a little above 1 so a perfect score and its label stay visible
TRAINING_TOP_KEYS = ("reward_mean", "signal_frac", "reference_present_frac")
TRAINING_BOTTOM_KEYS = ("kl", "clip_frac")

Interval = dict[str, Any]


def plot_accuracy_by_estimator(versions: list[dict], path: str | Path) -> Path:
    """Grouped bars at full G: single, each estimator, pass@G; versions side by side."""
    series = _series_names(versions)
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    width = 0.8 / len(versions)
    for index, version in enumerate(versions):
        full = version["by_g"][-1]
        offset = (index - (len(versions) - 1) / 2) * width
        points = [(pos + offset, _interval(full, name)) for pos, name in enumerate(series)]
        points = [(x, interval) for x, interval in points if interval is not None]
        intervals = [interval for _, interval in points]
        bars = ax.bar([x for x, _ in points], [i["value"] for i in intervals], width,
                      yerr=_yerr(intervals), capsize=3, label=version["label"])
        ax.bar_label(bars, labels=[f"{i['value']:.2f}" for i in intervals], padding=2, fontsize=8)
    group_size = _joined(v["by_g"][-1]["g"] for v in versions)
    ax.set_xticks(range(len(series)), [_series_label(name, group_size) for name in series])
    prompts = _joined(v["by_g"][-1]["single"]["n"] for v in versions)
    _style_accuracy_axes(ax, "estimator")
    ax.legend(title="version", loc="best", fontsize=8)
    ax.set_title(f"Accuracy by estimator (n = {prompts} prompts, G = {group_size})")
    return _save(fig, path)


def plot_scaling(versions: list[dict], path: str | Path) -> Path:
    """Accuracy vs group size g, one line per series with its interval band; a panel per version."""
    series = _series_names(versions)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = max(FIGSIZE[0], SCALING_WIDTH_PER_VERSION * len(versions))
    fig, axes = plt.subplots(1, len(versions), sharey=True, squeeze=False,
                             figsize=(width, FIGSIZE[1]), dpi=DPI)
    for ax, version in zip(axes[0], versions):
        for index, name in enumerate(series):
            _plot_series_vs_g(ax, version["by_g"], name, colours[index % len(colours)])
        group_sizes = [entry["g"] for entry in version["by_g"]]
        ax.set_xscale("log", base=2)
        ax.set_xticks(group_sizes, [str(g) for g in group_sizes])
        ax.minorticks_off()
        _style_accuracy_axes(ax, "group size g")
        ax.set_title(str(version["label"]))
    axes[0][0].legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_training(metrics: list[dict], path: str | Path,
                  version_accuracy: list[dict] | None = None) -> Path:
    """Learner curves against step: rewards and fractions on top, kl and clip_frac below.

    ``version_accuracy`` items are ``{"step", "label", "single": interval}``: evaluated versions
    drawn as points on the top panel. Keys absent from a line are skipped, since older metrics
    files predate some of them.
    """
    if not metrics:
        raise ValueError("no learner steps in metrics.jsonl")
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=TRAINING_FIGSIZE, dpi=DPI)
    for key in TRAINING_TOP_KEYS:
        _plot_metric(top, metrics, key)
    for point in version_accuracy or []:
        top.errorbar([point["step"]], [point["single"]["value"]], yerr=_yerr([point["single"]]),
                     fmt="o", capsize=3, label=f"single accuracy {point['label']}")
    for key in TRAINING_BOTTOM_KEYS:
        _plot_metric(bottom, metrics, key)
    top.set_ylim(*ACCURACY_YLIM)
    top.set_ylabel("fraction / reward")
    bottom.set_ylabel("kl, clip fraction")
    bottom.set_xlabel("learner step")
    top.set_title("Training")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
            ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_all(results: dict, out_dir: str | Path, metrics: list[dict] | None = None) -> list[Path]:
    """Every plot of an evaluation into ``out_dir``; training.png only when there are metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    versions = results["versions"]
    paths = [plot_accuracy_by_estimator(versions, out_dir / "accuracy_by_estimator.png")]
    if any(len(v["by_g"]) > 1 for v in versions):  # measured at more than one G
        paths.append(plot_scaling(versions, out_dir / "accuracy_vs_g.png"))
    if metrics:
        trained = [
            {"step": v["step"], "label": v["label"], "single": v["by_g"][-1]["single"]}
            for v in versions if v.get("step") is not None
        ]
        paths.append(plot_training(metrics, out_dir / "training.png", trained))
    return paths


def _series_names(versions: list[dict]) -> list[str]:
    """"single", the estimators any version has (registered ones in registry order), "pass_at_g"."""
    present: dict[str, None] = {}
    for version in versions:
        for entry in version["by_g"]:
            present.update(dict.fromkeys(entry.get("estimators", {})))
    known = [name for name in ESTIMATORS if name in present]
    return ["single", *known, *(name for name in present if name not in known), "pass_at_g"]


def _series_label(name: str, g: object) -> str:
    return f"pass@{g}" if name == "pass_at_g" else name


def _interval(entry: dict, name: str) -> Interval | None:
    """The accuracy interval of one series at one g, or None when that estimator did not run."""
    if name in ("single", "pass_at_g"):
        return entry.get(name)
    estimator = entry.get("estimators", {}).get(name)
    return estimator["accuracy"] if estimator else None


def _yerr(intervals: list[Interval]) -> list[list[float]]:
    """Asymmetric error bars; clamped at 0 so rounding in the file cannot make them negative."""
    below = [max(i["value"] - i["low"], 0.0) for i in intervals]
    above = [max(i["high"] - i["value"], 0.0) for i in intervals]
    return [below, above]


def _joined(values) -> str:
    """One value, or "a/b" when versions disagree (e.g. different numbers of prompts)."""
    return "/".join(str(v) for v in sorted(set(values)))


def _plot_series_vs_g(ax, by_g: list[dict], name: str, colour: str) -> None:
    points = [(entry["g"], _interval(entry, name)) for entry in by_g]
    points = [(g, interval) for g, interval in points if interval is not None]
    if not points:
        return
    gs = [g for g, _ in points]
    ax.plot(gs, [i["value"] for _, i in points], marker="o", color=colour,
            label=_series_label(name, "g"))
    ax.fill_between(gs, [i["low"] for _, i in points], [i["high"] for _, i in points],
                    color=colour, alpha=0.15)


def _plot_metric(ax, metrics: list[dict], key: str) -> None:
    """One learner metric against step, from the lines that have it; nothing if none do."""
    points = [(line["step"], line[key]) for line in metrics if line.get(key) is not None]
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], label=key)


def _style_accuracy_axes(ax, xlabel: str) -> None:
    ax.set_ylim(*ACCURACY_YLIM)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)  # grid behind the bars, not across them


def _save(fig, path: str | Path) -> Path:
    """Write the PNG at the figure's own size (no bbox trimming) and always release the figure."""
    path = Path(path)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path

"""Figures (PNG + PDF): perplexity and KLD vs bits, model size vs perplexity with its Pareto front, timing bars."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.labels import CONFIG_KEYS, config_label, is_reference
from analysis.report.select import varying_keys

# Where a run may record the parameter count used to turn bits/weight into a model size.
PARAMS_DETAIL_KEY = "params"


def _pyplot():
    # Agg: reports are written on headless machines; chosen at first use so importing stays side-effect free.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)  # constrained layout already fits labels; "tight" would draw twice
    _pyplot().close(fig)
    return paths


def _panels(n: int, width: float = 4.0, height: float = 3.2):
    plt = _pyplot()
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _safe_stem(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def _metric_vs_bits(frame: pd.DataFrame, out_dir: Path, metric: str, ylabel: str, what: str, stem: str,
                    reference_line: bool) -> list[Path]:
    """`metric` (suite ppl) vs bits, one line per method (and group size), one panel per eval set; with
    `reference_line` the fp value as a dashed line."""
    rows = frame[(frame["suite"] == "ppl") & (frame["metric"] == metric)]
    quant = rows[~is_reference(rows) & rows["bits"].notna()]
    if quant.empty:
        return []
    extra = varying_keys(quant)
    series = config_label(quant.assign(bits=pd.NA), extra)  # label without bits: bits is the x axis
    quant = quant.assign(series=series.reindex(quant.index))
    tasks = sorted((rows if reference_line else quant)["task"].unique())
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for name, line in quant[quant["task"] == task].groupby("series", sort=True):
            line = line.sort_values("bits")
            ax.plot(line["bits"].astype(float), line["value"], marker="o", label=name)
        ref = rows[is_reference(rows) & (rows["task"] == task)]["value"]
        if reference_line and not ref.empty:
            ax.axhline(ref.iloc[0], color="black", linestyle="--", linewidth=1, label="fp")
        ax.set(title=f"{task}", xlabel="bits", ylabel=ylabel)
        ax.set_xticks(sorted(quant["bits"].dropna().astype(int).unique()))
        ax.legend(fontsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: {what}")
    return _save(fig, out_dir, f"{stem}_{_safe_stem(frame['model'].iloc[0])}")


def plot_ppl_vs_bits(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Perplexity vs bits, one line per method (and group size), one panel per eval set; fp as a dashed line."""
    return _metric_vs_bits(frame, out_dir, "ppl", "perplexity", "perplexity vs bits", "ppl_vs_bits", True)


def plot_kld_vs_bits(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Mean KL divergence from fp (nats/token) vs bits, as plot_ppl_vs_bits (no fp line: fp is the zero)."""
    return _metric_vs_bits(frame, out_dir, "kld", "mean KLD vs fp (nats/token)", "KL divergence from fp vs bits",
                           "kld_vs_bits", False)


def model_size(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per config: storage size (MB if a parameter count is recorded for every config, else bits/weight) and its axis name."""
    bpw = frame[(frame["suite"] == "quant") & (frame["metric"] == "storage_bits_per_weight")]
    params = bpw["detail"].map(_params_from_detail)
    if not bpw.empty and params.notna().all():
        # bits/weight x parameters / 8 bits per byte / 1e6 -> MB
        return bpw.assign(size=bpw["value"] * params / 8e6), "model size (MB)"
    return bpw.assign(size=bpw["value"]), "storage bits per weight"


def _params_from_detail(detail) -> float:
    try:
        return float(json.loads(detail)[PARAMS_DETAIL_KEY])
    except (TypeError, ValueError, KeyError):
        return float("nan")


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated by any other (smaller or equal x with strictly lower y), sorted by x."""
    ordered = points.sort_values([x, y], kind="stable")
    keep = ordered[y] < ordered[y].cummin().shift(fill_value=float("inf"))
    return ordered[keep]


def plot_size_vs_ppl(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Model size vs perplexity per eval set, with the Pareto front of the quantized configs."""
    sizes, axis = model_size(frame)
    ppl = frame[(frame["suite"] == "ppl") & (frame["metric"] == "ppl")]
    if sizes.empty or ppl.empty:
        return []
    points = ppl.merge(sizes[CONFIG_KEYS + ["size"]], on=CONFIG_KEYS, how="inner")
    if points.empty:
        return []
    points = points.assign(label=config_label(points, varying_keys(points)).reindex(points.index))
    tasks = sorted(points["task"].unique())
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        here = points[points["task"] == task]
        ax.scatter(here["size"], here["value"], s=18)
        for row in here.itertuples():
            ax.annotate(row.label, (row.size, row.value), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(here, "size", "value")
        ax.step(front["size"], front["value"], where="post", color="tab:red", marker="o", markerfacecolor="none",
                markersize=9, label="Pareto front")
        ref = ppl[is_reference(ppl) & (ppl["task"] == task)]["value"]
        if not ref.empty:
            ax.axhline(ref.iloc[0], color="black", linestyle="--", linewidth=1, label="fp")
        ax.set(title=task, xlabel=axis, ylabel="perplexity")
        ax.legend(fontsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: size vs perplexity")
    return _save(fig, out_dir, f"size_vs_ppl_{_safe_stem(frame['model'].iloc[0])}")


def plot_kld_vs_storage_bits(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Mean KLD from fp (with its interval) against the bits per weight each config stores, one panel per eval set,
    every method and checkpoint format as a point, the Pareto front (fewer bits and lower KLD) marked. The budget
    axis is what the format stores (scales, zeros, super-block scales, g_idx), so unequal budgets show as such."""
    bpw = frame[(frame["suite"] == "quant") & (frame["metric"] == "storage_bits_per_weight")]
    kld = frame[(frame["suite"] == "ppl") & (frame["metric"] == "kld") & ~is_reference(frame)]
    points = kld.merge(bpw[CONFIG_KEYS + ["value"]].rename(columns={"value": "bpw"}), on=CONFIG_KEYS, how="inner")
    if points.empty:
        return []
    points = points.assign(label=config_label(points, varying_keys(points)).reindex(points.index))
    tasks = sorted(points["task"].unique())
    fig, axes = _panels(len(tasks), width=4.6, height=3.6)
    for ax, task in zip(axes, tasks):
        here = points[points["task"] == task]
        low = (here["value"] - here["ci_low"]).clip(lower=0).fillna(0)
        high = (here["ci_high"] - here["value"]).clip(lower=0).fillna(0)
        ax.errorbar(here["bpw"], here["value"], yerr=[low, high], fmt="o", markersize=4, capsize=2, linewidth=0.8)
        for row in here.itertuples():
            ax.annotate(row.label, (row.bpw, row.value), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(here, "bpw", "value")
        ax.step(front["bpw"], front["value"], where="post", color="tab:red", marker="o", markerfacecolor="none",
                markersize=9, label="Pareto front")
        ax.set(title=task, xlabel="stored bits per weight (quantized linears)", ylabel="mean KLD vs fp (nats/token)",
               yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: KL divergence vs bits per weight (95% intervals)")
    return _save(fig, out_dir, f"kld_vs_bpw_{_safe_stem(frame['model'].iloc[0])}")


def speed_points(frame: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """KLD rows of the checkpoints (method "ckpt:<label>") joined with benchmarks/bench_runtimes.py's rows (its
    --csv) on the label: decode_tps, base_decode_tps, bound_tps, runtime. Checkpoints measured with no CPU runtime
    (no decode_tps) are left out."""
    kld = frame[(frame["suite"] == "ppl") & (frame["metric"] == "kld") & ~is_reference(frame)]
    timed = speed.dropna(subset=["decode_tps"]).assign(method=lambda s: "ckpt:" + s["label"].astype(str))
    return kld.merge(timed[["method", "runtime", "decode_tps", "base_decode_tps", "bound_tps"]], on="method")


def plot_kld_vs_decode(frame: pd.DataFrame, speed: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Mean KLD from fp (with its interval) against decode tokens/s in each checkpoint's own CPU runtime, one panel per
    eval set, the Pareto front (faster and lower KLD) marked. Runtimes differ: each point's baseline speed in its own
    runtime is in the speed table beside it."""
    points = speed_points(frame, speed)
    if points.empty:
        return []
    points = points.assign(label=points["method"].str.removeprefix("ckpt:"))
    tasks = sorted(points["task"].unique())
    fig, axes = _panels(len(tasks), width=4.6, height=3.6)
    for ax, task in zip(axes, tasks):
        here = points[points["task"] == task]
        low = (here["value"] - here["ci_low"]).clip(lower=0).fillna(0)
        high = (here["ci_high"] - here["value"]).clip(lower=0).fillna(0)
        ax.errorbar(here["decode_tps"], here["value"], yerr=[low, high], fmt="o", markersize=4, capsize=2,
                    linewidth=0.8)
        for row in here.itertuples():
            ax.annotate(row.label, (row.decode_tps, row.value), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(here.assign(slowness=-here["decode_tps"]), "slowness", "value")
        ax.step(front["decode_tps"], front["value"], where="post", color="tab:red", marker="o",
                markerfacecolor="none", markersize=9, label="Pareto front")
        ax.set(title=task, xlabel="decode tokens/s (own CPU runtime)", ylabel="mean KLD vs fp (nats/token)",
               yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: KL divergence vs decode speed (95% intervals)")
    return _save(fig, out_dir, f"kld_vs_decode_{_safe_stem(frame['model'].iloc[0])}")


def plot_timing(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One bar panel per timing (task, metric), one bar per config."""
    timing = frame[frame["suite"] == "timing"]
    if timing.empty:
        return []
    timing = timing.assign(config=config_label(timing, varying_keys(timing)).reindex(timing.index))
    panels = timing.groupby(["task", "metric"], sort=True)
    fig, axes = _panels(panels.ngroups, width=4.5)
    for ax, ((task, metric), bars) in zip(axes, panels):
        ax.bar(bars["config"], bars["value"], color="tab:blue")
        ax.set(title=task, ylabel=metric)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: timing")
    return _save(fig, out_dir, f"timing_{_safe_stem(frame['model'].iloc[0])}")

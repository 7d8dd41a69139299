"""Figures (PNG + PDF): perplexity and KLD vs bits, model size vs perplexity with its Pareto front, timing bars.

Every figure is laid out to be read at its saved size: titles wrap to the figure's width, point labels are placed
where they collide with no other label, marker or legend (joined to their point by a leader line when moved), and a
KLD axis that must show an exact 0 is symmetric-log rather than log (which cannot show it)."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.labels import config_keys, config_label, is_reference
from analysis.report.select import varying_keys

# Where a run may record the parameter count used to turn bits/weight into a model size.
PARAMS_DETAIL_KEY = "params"


def _pyplot():
    # Agg: reports are written on headless machines; chosen at first use so importing stays side-effect free.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


DPI = 150
LABEL_GID = "point-label"  # the gid of every point label, so tests can find them


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=DPI)  # constrained layout already fits labels; "tight" would draw twice
    _pyplot().close(fig)
    return paths


def _suptitle(fig, text: str, fontsize: float = 11.0) -> None:
    """The figure's title, wrapped onto as many lines as it needs to fit inside the figure's width."""
    title = fig.suptitle(text, fontsize=fontsize)
    renderer = fig.canvas.get_renderer()
    width, room = title.get_window_extent(renderer).width, 0.94 * fig.bbox.width
    if width > room:
        chars = max(10, int(len(text) * room / width))
        title.set_text("\n".join(textwrap.wrap(text, chars)))


def _label_points(fig, requests: list[tuple], fontsize: float = 6.0) -> None:
    """Write each label of `requests` [(axes, x, y, text)] near its point where it overlaps no other label, no marker
    and no legend and stays inside its axes: the first free spot on rings of offsets around the point, nearest first;
    a label that had to move off its point's corner gets a leader line. Called once the figure's axes are complete:
    it draws the figure to learn where everything is, and the labels stay out of the layout."""
    if not requests:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    per_point = fig.dpi / 72.0
    taken, lines = {}, {}  # axes -> bboxes (display pixels) no label may overlap / that labels had better not cross
    for ax in {r[0] for r in requests}:
        boxes = [legend.get_window_extent(renderer)] if (legend := ax.get_legend()) is not None else []
        for _, x, y, _ in (r for r in requests if r[0] is ax):
            px, py = ax.transData.transform((x, y))
            boxes.append(_box(px - 5 * per_point, py - 5 * per_point, 10 * per_point, 10 * per_point))  # its markers
        taken[ax], lines[ax] = boxes, [box for line in ax.get_lines() for box in _along(line, per_point)]
    for ax, x, y, text in sorted(requests, key=lambda r: (id(r[0]), r[1], r[2])):
        px, py = ax.transData.transform((x, y))
        probe = ax.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        w, h = extent.width / per_point + 1, extent.height / per_point + 1  # points
        frame = ax.get_window_extent(renderer)
        best, best_cost = None, math.inf
        for i, (dx, dy, far) in enumerate(_offsets(w, h)):
            box = _box(px + dx * per_point, py + dy * per_point, w * per_point, h * per_point)
            inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
            cost = (sum(_overlap(box, other) for other in taken[ax]) + 0.2 * sum(_overlap(box, b) for b in lines[ax])
                    + (0 if inside else 1e9) + i * 1e-6)
            if cost < best_cost:
                best, best_cost = (far, dx, dy, box), cost
            if cost < 1e-3:
                break
        far, dx, dy, box = best
        others = [ax.transData.transform((ox, oy)) for a, ox, oy, _ in requests if a is ax and (ox, oy) != (x, y)]
        nearer = any(_distance(box, o) < 1.2 * _distance(box, (px, py)) for o in others)  # whose label is it?
        arrow = dict(arrowstyle="-", color="0.45", linewidth=0.5, shrinkA=0, shrinkB=2) if far or nearer else None
        label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            ha="left", va="bottom", arrowprops=arrow, annotation_clip=False)
        label.set_gid(LABEL_GID)
        label.set_in_layout(False)  # placed for this layout: it must not move the axes it was placed in
        taken[ax].append(box)


def _offsets(w: float, h: float, gap: float = 5.0, reach: int = 24) -> list[tuple[float, float, bool]]:
    """Offsets (points) of a label's lower-left corner from its point, nearest first, and whether the label then
    needs a leader line: the four corners beside the point, then a grid of places stepping by the label's height
    (stacks) and a third of its width, up to `reach` steps each way."""
    dxs = [gap + i * w / 3 for i in range(reach + 1)] + [-gap - w - i * w / 3 for i in range(reach + 1)]
    dys = [gap + j * (h + 1.5) for j in range(reach + 1)] + [-gap - h - j * (h + 1.5) for j in range(reach + 1)]

    def distance(dx: float, dy: float) -> float:  # from the point to the label's nearest corner
        return math.hypot(dx if dx > 0 else dx + w, dy if dy > 0 else dy + h)

    ranked = sorted(((dx, dy) for dx in dxs for dy in dys), key=lambda o: distance(*o))
    return [(dx, dy, distance(dx, dy) > 1.5 * gap * math.sqrt(2)) for dx, dy in ranked]


def _along(line, per_point: float, step: float = 3.0) -> list:
    """Small boxes (display pixels) every `step` points along a drawn line (its steps included), so labels keep off
    it where they can."""
    points = line.get_transform().transform(line.get_path().vertices)
    half = 1.0 * per_point
    boxes = []
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if not np.isfinite([x0, y0, x1, y1]).all():
            continue
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / (step * per_point)))
        for t in np.linspace(0.0, 1.0, n + 1):
            boxes.append(_box(x0 + t * (x1 - x0) - half, y0 + t * (y1 - y0) - half, 2 * half, 2 * half))
    return boxes


def _box(x0: float, y0: float, w: float, h: float):
    from matplotlib.transforms import Bbox

    return Bbox.from_bounds(x0, y0, w, h)


def _distance(box, point) -> float:
    """From a point to the nearest point of a box (display pixels)."""
    dx = max(box.x0 - point[0], 0.0, point[0] - box.x1)
    dy = max(box.y0 - point[1], 0.0, point[1] - box.y1)
    return math.hypot(dx, dy)


def _overlap(a, b) -> float:
    """The area two boxes share (0 when they only touch)."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _kld_scale(ax, values: pd.Series) -> None:
    """Log scale for KLD, which spans decades; where a value is exactly 0 (a checkpoint equal to the baseline) a
    symmetric-log scale, linear up to the power of ten below the smallest positive value and as wide as a decade
    there, so 0 has its own tick a decade's height under the first power of ten."""
    values = values.astype(float)
    positive = values[values > 0]
    if (values <= 0).any():
        floor = 10.0 ** math.floor(math.log10(float(positive.min()))) if not positive.empty else 1e-3
        ax.set_yscale("symlog", linthresh=floor, linscale=1.0)
        ax.set_ylim(bottom=0)
    else:
        ax.set_yscale("log")


def _panels(n: int, width: float = 4.0, height: float = 3.2, extra_height: float = 0.0):
    """A constrained-layout figure of n panels, three per row; `extra_height` inches for a legend under them."""
    plt = _pyplot()
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(width * ncols, 5.0), height * nrows + extra_height),
                             squeeze=False, layout="constrained")
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
    entries = quant["series"].nunique() + reference_line
    columns = max(1, min(entries, 2 * min(len(tasks), 3)))  # the legend's, under the panels
    fig, axes = _panels(len(tasks), extra_height=0.3 + 0.17 * -(-entries // columns))
    for ax, task in zip(axes, tasks):
        for name, line in quant[quant["task"] == task].groupby("series", sort=True):
            line = line.sort_values("bits")
            ax.plot(line["bits"].astype(float), line["value"], marker="o", label=name)
        ref = rows[is_reference(rows) & (rows["task"] == task)]["value"]
        if reference_line and not ref.empty:
            ax.axhline(ref.iloc[0], color="black", linestyle="--", linewidth=1, label="fp")
        ax.set(title=f"{task}", xlabel="bits", ylabel=ylabel)
        ax.set_xticks(sorted(quant["bits"].dropna().astype(int).unique()))
        if metric == "ppl" and line_values(ax).max() > 3 * line_values(ax).min() > 0:
            _plain_log_y(ax)  # w3 next to w4: decades apart, each readable
    handles = {}  # one legend for all panels, under them: the series are the same in each
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=columns, fontsize=7)
    _suptitle(fig, f"{frame['model'].iloc[0]}: {what}")
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


def line_values(ax) -> np.ndarray:
    """Every y value the axes' lines draw (finite ones)."""
    values = np.concatenate([np.asarray(line.get_ydata(), float) for line in ax.get_lines()] or [np.zeros(0)])
    return values[np.isfinite(values)] if values.size else np.ones(1)


def _plain_log_y(ax) -> None:
    """A log y axis with plain numbers at 1, 2 and 5 times each power of ten (not 2 x 10^1)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _room_for_labels(ax, right: float = 0.45, top: float = 0.25) -> None:
    """Widen the data limits so labels beside the rightmost and topmost points stay inside the axes: `right` and `top`
    are fractions of the data span (on the axis's own scale) added beyond the data."""
    ax.autoscale_view()
    x0, x1 = ax.get_xlim()
    ax.set_xlim(x0, x1 + right * (x1 - x0) if x1 > x0 else x1 + 1)
    y0, y1 = ax.get_ylim()
    if ax.get_yscale() == "log" and y0 > 0:
        ax.set_ylim(y0, y1 * (y1 / y0) ** top)
    elif ax.get_yscale() == "symlog" and y1 > 0:
        ax.set_ylim(y0, y1 * 4)
    else:
        ax.set_ylim(y0, y1 + top * (y1 - y0))


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
    keys = config_keys(frame)
    points = ppl.merge(sizes[keys + ["size"]], on=keys, how="inner")
    if points.empty:
        return []
    points = points.assign(label=config_label(points, varying_keys(points)).reindex(points.index))
    tasks = sorted(points["task"].unique())
    fig, axes = _panels(len(tasks))
    labels = []
    for ax, task in zip(axes, tasks):
        here = points[points["task"] == task]
        ax.scatter(here["size"], here["value"], s=18)
        labels += [(ax, row.size, row.value, row.label) for row in here.itertuples()]
        front = pareto_front(here, "size", "value")
        ax.step(front["size"], front["value"], where="post", color="tab:red", marker="o", markerfacecolor="none",
                markersize=9, label="Pareto front")
        ref = ppl[is_reference(ppl) & (ppl["task"] == task)]["value"]
        if not ref.empty:
            ax.axhline(ref.iloc[0], color="black", linestyle="--", linewidth=1, label="fp")
        ax.set(title=task, xlabel=axis, ylabel="perplexity")
        if here["value"].max() > 3 * here["value"].min():  # w3 next to w4: decades apart, each readable
            _plain_log_y(ax)
        _room_for_labels(ax)
        ax.legend(fontsize=7, loc="upper right")
    _suptitle(fig, f"{frame['model'].iloc[0]}: size vs perplexity")
    _label_points(fig, labels)
    return _save(fig, out_dir, f"size_vs_ppl_{_safe_stem(frame['model'].iloc[0])}")


def plot_kld_vs_storage_bits(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Mean KLD from fp (with its interval) against the bits per weight each config stores, one panel per eval set,
    every method and checkpoint format as a point, the Pareto front (fewer bits and lower KLD) marked. The budget
    axis is what the format stores (scales, zeros, super-block scales, g_idx), so unequal budgets show as such."""
    bpw = frame[(frame["suite"] == "quant") & (frame["metric"] == "storage_bits_per_weight")]
    kld = frame[(frame["suite"] == "ppl") & (frame["metric"] == "kld") & ~is_reference(frame)]
    keys = config_keys(frame)
    points = kld.merge(bpw[keys + ["value"]].rename(columns={"value": "bpw"}), on=keys, how="inner")
    if points.empty:
        return []
    points = points.assign(label=config_label(points, varying_keys(points)).reindex(points.index))
    tasks = sorted(points["task"].unique())
    fig, axes = _panels(len(tasks), width=4.6, height=3.6)
    labels = []
    for ax, task in zip(axes, tasks):
        here = points[points["task"] == task]
        low = (here["value"] - here["ci_low"]).clip(lower=0).fillna(0)
        high = (here["ci_high"] - here["value"]).clip(lower=0).fillna(0)
        ax.errorbar(here["bpw"], here["value"], yerr=[low, high], fmt="o", markersize=4, capsize=2, linewidth=0.8)
        labels += [(ax, row.bpw, row.value, row.label) for row in here.itertuples()]
        front = pareto_front(here, "bpw", "value")
        ax.step(front["bpw"], front["value"], where="post", color="tab:red", marker="o", markerfacecolor="none",
                markersize=9, label="Pareto front")
        ax.set(title=task, xlabel="stored bits per weight (quantized linears)", ylabel="mean KLD vs fp (nats/token)")
        _kld_scale(ax, pd.concat([here["value"], here["ci_low"].dropna(), here["ci_high"].dropna()]))
        _room_for_labels(ax)
        ax.legend(fontsize=7, loc="upper right")
    _suptitle(fig, f"{frame['model'].iloc[0]}: KL divergence vs bits per weight (95% intervals)")
    _label_points(fig, labels)
    return _save(fig, out_dir, f"kld_vs_bpw_{_safe_stem(frame['model'].iloc[0])}")


def speed_points(frame: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """KLD rows of the checkpoints (method "ckpt:<label>") joined with benchmarks/bench_runtimes.py's rows (its
    --csv) on the label: decode_tps, base_decode_tps, bound_tps, runtime, and the tokens timed (prompt, decode: rows
    of several runs of the benchmark may differ). Checkpoints measured with no CPU runtime
    (no decode_tps) are left out."""
    kld = frame[(frame["suite"] == "ppl") & (frame["metric"] == "kld") & ~is_reference(frame)]
    timed = speed.dropna(subset=["decode_tps"]).assign(method=lambda s: "ckpt:" + s["label"].astype(str))
    return kld.merge(timed[["method", "runtime", "decode_tps", "base_decode_tps", "bound_tps", "prompt", "decode"]],
                     on="method")


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
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")  # rotated labels end under their bar, not half past it
    _suptitle(fig, f"{frame['model'].iloc[0]}: timing")
    return _save(fig, out_dir, f"timing_{_safe_stem(frame['model'].iloc[0])}")


FALLBACK_SHARE = 0.005  # method.moe_min_tokens' default: an expert under this share is rounded to nearest


def _block_and_expert(name: str) -> tuple[int, int]:
    """'model.layers.12.mlp.experts.3' -> (12, 3): the first number in the name is the block, the last the expert."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return numbers[0], numbers[-1]


def plot_routing(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """A mixture of experts: the share of the calibration tokens its routers sent each expert (`suite=routing`
    rows), for one calibration draw (the first method in name order, so AWQ's, which routes the full-precision
    model, when there is one): a heatmap, block by expert, and the histogram of the shares with the fallback
    threshold (0.5%: experts left of it are rounded to nearest by default)."""
    routed = frame[(frame["suite"] == "routing") & (frame["metric"] == "routed_tokens")]
    if routed.empty:
        return []
    keys = ["method", "calib_samples", "calib_seqlen", "calib_seed", "run_id"]
    (method, samples, seqlen, seed, _), one = next(iter(routed.groupby(keys, sort=True, dropna=False)))
    one = one.drop_duplicates("task")
    where = [_block_and_expert(t) for t in one["task"]]
    n_blocks, n_experts = max(b for b, _ in where) + 1, max(e for _, e in where) + 1
    share = np.full((n_blocks, n_experts), np.nan)
    for (block, expert), count, n in zip(where, one["value"], one["n"].astype(float)):
        share[block, expert] = count / n
    fig, (heat, hist) = _panels(2, width=4.6, height=4.0)
    image = heat.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=heat, label="share of calibration tokens")
    heat.set(xlabel="expert", ylabel="block", title="share per expert")
    values = share[np.isfinite(share)]
    hist.hist(values, bins=30, color="tab:blue")
    hist.axvline(FALLBACK_SHARE, color="tab:red", linestyle="--",
                 label=f"{FALLBACK_SHARE:.1%}: {int((values < FALLBACK_SHARE).sum())} of {values.size} below")
    hist.set(xlabel="share of calibration tokens", ylabel="experts", title="distribution")
    hist.legend(fontsize=7, loc="upper right")
    model = frame["model"].iloc[0]
    draw = "" if pd.isna(samples) else f", {int(samples)} x {int(seqlen)} tokens, draw {int(seed)}"
    _suptitle(fig, f"{model}: calibration tokens routed to each expert ({method}{draw})")
    return _save(fig, out_dir, f"routing_{_safe_stem(model)}")

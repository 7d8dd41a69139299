"""Every plot of the report, rendered from a small results tree, reads at its saved size (issue 30, finding 15): no
warning while it is made, every text inside the figure, no two point labels over each other (coinciding points
included), long titles wrapped, and a KLD of exactly 0 on an axis that shows it."""
from __future__ import annotations

import itertools
import json
import warnings

import matplotlib
import pytest

from analysis.report import make_report
from analysis.report import plots
from analysis.results import to_frame

matplotlib.use("Agg")

MODEL = "smollm2_135m"


def _rows(run_id, method, bits, group, kld: dict, ppl: dict, bpw, calib=None, timing=None) -> list[dict]:
    base = dict(run_id=run_id, config_hash=run_id, model=MODEL, method=method, bits=bits, group_size=group,
                calib_source=calib, calib_samples=16 if calib else None, calib_seqlen=512 if calib else None,
                calib_seed=0 if calib else None, seed=0, model_fingerprint="mf01", data_fingerprint="df01",
                started_at="2026-12-07T10:00:00+00:00")
    rows = []
    for task, value in ppl.items():
        rows.append(dict(base, suite="ppl", task=task, metric="ppl", value=value, ci_low=value * 0.9,
                         ci_high=value * 1.1))
    for task, value in kld.items():
        rows.append(dict(base, suite="ppl", task=task, metric="kld", value=value, ci_low=value * 0.9,
                         ci_high=value * 1.1))
    if bpw is not None:
        rows.append(dict(base, suite="quant", task="all", metric="storage_bits_per_weight", value=bpw,
                         detail=json.dumps({"params": 134_000_000})))
    for (task, metric), value in (timing or {}).items():
        rows.append(dict(base, suite="timing", task=task, metric=metric, value=value))
    return rows


def arena(sets=("wiki",)) -> list[dict]:
    """The arena's crowd at 4.17-4.31 bits (several configs at the same budget, two at exactly the same point), a
    checkpoint of the baseline itself (KLD exactly 0) and long labels."""
    one = lambda v: {s: v * (1 + 0.1 * i) for i, s in enumerate(sets)}  # noqa: E731
    rows = _rows("fp", "fp", None, None, {}, one(13.6), None)
    for run_id, method, bits, group, kld, ppl, bpw, calib in (
            ("rtn4", "rtn", 4, 128, 0.425, 18.48, 4.17, None), ("rtn3", "rtn", 3, 128, 1.979, 85.07, 3.16, None),
            ("gptq4", "gptq", 4, 128, 0.368, 19.25, 4.17, "wiki"), ("awq4", "awq", 4, 128, 0.230, 16.77, 4.17, "wiki"),
            ("awq64", "awq", 4, 64, 0.174, 15.76, 4.31, "wiki"),
            ("autoawq", "ckpt:autoawq-w4g64-1a2b3c4d", 4, 64, 0.178, 15.86, 4.31, None),
            ("autoround", "ckpt:autoround-w4g64-5e6f7a8b", 4, 64, 0.174, 15.76, 4.31, None),
            ("gguf", "ckpt:gguf-Q4_K_M-9c8d7e6f", 4, 32, 0.060, 14.51, 5.53, None),
            ("same", "ckpt:the-baseline-itself-0a0b0c0d", 8, 32, 0.0, 13.6, 8.5, None)):
        timing = {("decode_bs1", "tokens_per_s"): 20.0 + bits} if method in ("rtn", "awq") else None
        rows += _rows(run_id, method, bits, group, one(kld), one(ppl), bpw, calib, timing)
    return rows + routing_rows()


def routing_rows(blocks: int = 4, experts: int = 8, tokens: int = 8192) -> list[dict]:
    """A mixture's routing as quantize_stage records it (top-2: each block's counts sum to 2 x tokens), one expert
    of block 1 never chosen and one of block 3 under 0.5%, on an AWQ run of the same model."""
    base = dict(run_id="awq4", config_hash="awq4", model=MODEL, method="awq", bits=4, group_size=128,
                calib_source="wiki", calib_samples=16, calib_seqlen=512, calib_seed=0, seed=0,
                model_fingerprint="mf01", data_fingerprint="df01", started_at="2026-12-07T10:00:00+00:00")
    rows = []
    for b in range(blocks):
        counts = [2 * tokens // experts] * experts
        if b == 1:
            counts[0], counts[1] = 0, counts[1] + counts[0]
        if b == 3:
            counts[5], counts[6] = 20, counts[6] + counts[5] - 20
        rows += [dict(base, suite="routing", task=f"model.layers.{b}.mlp.experts.{e}", metric="routed_tokens",
                      value=c, n=tokens) for e, c in enumerate(counts)]
    return rows


def _figures(monkeypatch, frame, tmp_path):
    """make_report's figures, kept open for inspection, and the warnings raised while they were made."""
    made = []
    save = plots._save

    def keep(fig, out_dir, stem):
        made.append((stem, fig))
        return save(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", keep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_report(frame, tmp_path / "report")
    return made, [str(w.message) for w in caught]


def _overlap(a, b) -> float:
    """The area (pixels) two boxes share."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _drawn_texts(fig) -> list:
    """Every text the figure draws: its title, each axes' titles, axis labels, offset texts, the tick labels of the
    ticks inside the view (matplotlib keeps others, undrawn), annotations and legend texts."""
    texts = list(fig.texts) + ([fig._suptitle] if fig._suptitle is not None else [])
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = high - low
            texts += [axis.label, axis.offsetText]
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if low - 1e-9 * span <= tick.get_loc() <= high + 1e-9 * span:
                    texts += [tick.label1, tick.label2]
        legend = ax.get_legend()
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
    return [t for t in dict.fromkeys(texts) if t.get_visible() and t.get_text().strip()]


def _problems(stem, fig) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # a closed figure lost its canvas; the saved PNG was drawn by this one
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    found = []
    texts = _drawn_texts(fig)
    for t in texts:
        box = matplotlib.text.Text.get_window_extent(t, renderer)
        if box.x0 < frame.x0 - 1 or box.x1 > frame.x1 + 1 or box.y0 < frame.y0 - 1 or box.y1 > frame.y1 + 1:
            found.append(f"{stem}: {t.get_text()!r} is cut off at {box.bounds} (figure {frame.bounds})")
    # an annotation's own extent includes its leader line: the text's is the Text's
    boxes = [(t.get_text(), matplotlib.text.Text.get_window_extent(t, renderer)) for t in texts]
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):  # point labels, titles, legends, ticks: no two collide
        if _overlap(ba, bb) > 0.5:
            found.append(f"{stem}: {a!r} and {b!r} overlap")
    return found


@pytest.mark.parametrize("sets", [("wiki",), ("code", "prose", "wiki")])
def test_finding15_every_plot_reads_at_its_saved_size(monkeypatch, tmp_path, sets):
    made, caught = _figures(monkeypatch, to_frame(arena(sets)), tmp_path)
    stems = {stem.rsplit("_", 2)[0] for stem, _ in made}
    assert {"ppl_vs_bits", "kld_vs_bits", "kld_vs_bpw", "size_vs_ppl", "timing", "routing"} <= {s.split("_smollm2")[0]
                                                                                     for s, _ in made}, stems
    assert caught == []
    problems = [p for stem, fig in made for p in _problems(stem, fig)]
    assert problems == []
    kld = dict(made)[f"kld_vs_bpw_{MODEL}"]
    assert all(ax.get_yscale() == "symlog" and ax.get_ylim()[0] == 0 for ax in kld.axes if ax.get_visible())
    labels = [t for t in kld.findobj(matplotlib.text.Text) if t.get_gid() == "point-label"]
    assert len(labels) == 9 * len(sets)  # every quantized config is labelled, the two at one point included


def test_the_routing_plot_shows_each_experts_share_and_counts_those_under_the_fallback_share(monkeypatch, tmp_path):
    """issue 31: the per-expert token histogram of a mixture, from its `suite=routing` rows."""
    made, caught = _figures(monkeypatch, to_frame(arena()), tmp_path)
    fig = dict(made)[f"routing_{MODEL}"]
    assert caught == [] and _problems("routing", fig) == []
    heat = fig.axes[0].images[0].get_array()
    assert heat.shape == (4, 8) and heat[1, 0] == 0 and abs(heat.sum() - 4 * 2) < 1e-9  # top-2: 2 per block
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["0.5%: 2 of 32 below"]

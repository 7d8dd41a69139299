"""The tables of the mixture-of-experts study (scripts/study_moe.sh; docs/moe.md), from its finished runs alone:

    python scripts/study_moe_tables.py results/moe_study

1. Quality per configuration (method, bits, calibration routing, samples): each calibration draw's perplexity and KLD
   on wiki, code and prose, with the 95% interval of a single run (the draws are listed, not averaged: with two
   draws the draw-to-draw spread is shown, not estimated; `python -m analysis.draws` says what it costs).
2. Experts rounded to nearest for too few routed calibration tokens (`experts_fallback`), per configuration.
3. The routing of the calibration tokens (every block, every expert): the share of the calibration tokens each expert
   was sent (top-k: shares sum to k), its smallest, median and largest, and how many experts fell under 0.5%.

Paired verdicts (one family of simultaneous intervals) come from `python -m analysis.compare`; this script prints
the commands for the study's pairs at the end. It reads run directories only (no model, no torch).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.results import find_run_dirs, read_run  # noqa: E402

SETS = ("wiki", "code", "prose")
FALLBACK_SHARE = 0.005  # the default method.moe_min_tokens


def routing_of(run_dir: Path) -> str:
    """'routed' or 'all': calib.moe_routing as the run recorded it (null: routed, the default)."""
    key = json.loads((run_dir / "DONE").read_text()).get("result_key", {})
    return (key.get("calib") or {}).get("moe_routing") or "routed"


def load(paths: list[str]) -> pd.DataFrame:
    frames = []
    for run_dir in find_run_dirs(paths):
        frame = read_run(run_dir)
        frame["routing"] = routing_of(run_dir) if frame["calib_samples"].notna().any() else "-"
        frame["run_dir"] = str(run_dir)
        frames.append(frame)
    if not frames:
        raise SystemExit(f"no finished run under {paths}")
    return pd.concat(frames, ignore_index=True)


def config_name(row) -> str:
    if row["method"] == "fp":
        return "fp (unquantized MoE)"
    calib = ("" if pd.isna(row["calib_samples"])
             else f" {row['routing']} {int(row['calib_samples'])}x{int(row['calib_seqlen'])}")
    return f"{row['method']} w{int(row['bits'])}g{int(row['group_size'])}{calib}"


def quality_table(frame: pd.DataFrame) -> str:
    ppl = frame[(frame["suite"] == "ppl") & frame["metric"].isin(["ppl", "kld"]) & frame["task"].isin(SETS)]
    lines = ["| configuration | draw | " + " | ".join(f"ppl {s}" for s in SETS) + " | "
             + " | ".join(f"KLD {s}" for s in SETS) + " |", "|---|---:|" + "---:|" * (2 * len(SETS))]
    runs = ppl.drop_duplicates("run_dir").copy()
    runs["config"] = runs.apply(config_name, axis=1)
    runs = runs.sort_values(["method", "bits", "routing", "calib_samples", "calib_seed"], na_position="first")
    for _, run in runs.iterrows():
        cells = []
        for metric, fmt in (("ppl", "{:.2f} [{:.2f}, {:.2f}]"), ("kld", "{:.4f} [{:.4f}, {:.4f}]")):
            for s in SETS:
                hit = ppl[(ppl["run_dir"] == run["run_dir"]) & (ppl["metric"] == metric) & (ppl["task"] == s)]
                cells.append("—" if hit.empty else fmt.format(*hit.iloc[0][["value", "ci_low", "ci_high"]]))
        seed = "—" if pd.isna(run["calib_seed"]) else int(run["calib_seed"])
        lines.append(f"| {run['config']} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fallback_table(frame: pd.DataFrame) -> str:
    rows = frame[(frame["suite"] == "quant") & (frame["metric"] == "experts_fallback")].copy()
    if rows.empty:
        return "(no quantized mixture among these runs)"
    rows["config"] = rows.apply(config_name, axis=1)
    lines = ["| configuration | draw | experts rounded to nearest | of experts |", "|---|---:|---:|---:|"]
    for _, r in rows.sort_values(["method", "bits", "routing", "calib_samples", "calib_seed"]).iterrows():
        experts = json.loads(r["detail"]).get("experts") if isinstance(r["detail"], str) else None
        seed = "—" if pd.isna(r["calib_seed"]) else int(r["calib_seed"])
        lines.append(f"| {r['config']} | {seed} | {int(r['value'])} | {experts} |")
    return "\n".join(lines)


def routing_table(frame: pd.DataFrame) -> str:
    routed = frame[(frame["suite"] == "routing") & (frame["metric"] == "routed_tokens")].copy()
    if routed.empty:
        return "(no routing rows)"
    routed["share"] = routed["value"] / routed["n"].astype(float)
    lines = ["| calibration | experts | smallest share | median | largest | under 0.5% | never chosen |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    # one row per run: the routing depends on the calibration tokens and on what each block is fed (AWQ: the
    # full-precision output, so the unquantized model's routing; GPTQ: the quantized one)
    routed["config"] = routed.apply(config_name, axis=1)
    for (config, seed, _), one in routed.groupby(["config", "calib_seed", "run_dir"]):
        s = one["share"]
        lines.append(f"| {config} draw {int(seed)} | {len(s)} | {s.min():.4f} | {s.median():.4f} | {s.max():.4f} | "
                     f"{(s < FALLBACK_SHARE).sum()} | {(one['value'] == 0).sum()} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="the study's results directory (or run directories)")
    args = p.parse_args(argv)
    frame = load(args.paths)
    prov = frame.drop_duplicates("run_dir")
    print(f"runs: {prov['run_dir'].nunique()}; model {sorted(prov['model'].unique())}; commits "
          f"{sorted(prov['git_sha'].dropna().unique())}; device {sorted(prov['device'].dropna().unique())}\n")
    print("## Quality (each run's value and its 95% interval)\n")
    print(quality_table(frame) + "\n")
    print("## Experts rounded to nearest (fewer routed calibration tokens than method.moe_min_tokens = 0.5%)\n")
    print(fallback_table(frame) + "\n")
    print("## Routing of the calibration tokens (share of the tokens sent to each expert; top-2: shares sum to 2)\n")
    print(routing_table(frame) + "\n")
    root = " ".join(args.paths)
    print("## Paired verdicts: run these\n")
    for what, where in (("GPTQ against AWQ, w4, routed, both draws", "--where bits=4 --where calib_samples=8"),
                        ("w4 against w3", "--where calib_samples=8")):
        print(f"- {what}: `python -m analysis.compare {root} {where}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

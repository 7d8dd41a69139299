"""Regression gate: compare a current results tree with a baseline, row by row, under per-metric tolerances.

Reads results only. Exit status: 0 all rows within tolerance, 1 a regression, a changed result or a row
missing from current, 2 bad input (no finished runs, unreadable or unknown tolerance entries).
"""
from __future__ import annotations

import argparse
import math
import sys
from fnmatch import fnmatchcase
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import yaml

from analysis.labels import FINGERPRINT, ROW_KEYS, latest_per_key, method_label

# Rows are matched across the two trees by ROW_KEYS: the run hash (config_hash) holds paths and so differs between
# machines. Within one tree the latest run of those keys stands for them (its superseded runs are listed on stderr).
REGRESS_KEYS = ROW_KEYS + [FINGERPRINT]
from analysis.results import load_results

DIRECTIONS = ("lower", "higher", "none")
FAILING = ("regression", "changed", "missing")
NA_TEXT = "<NA>"
# Metric names a shared tolerance file may mention even when one results tree lacks them.
KNOWN_METRICS = ("ppl", "tokens", "windows", "wall_s", "acc", "acc_norm", "exact_match", "f1", "mcc",
                 "word_perplexity", "byte_perplexity", "bits_per_byte", "quant_wall_s", "storage_bits_per_weight",
                 "quantized_layers", "short_group_layers")


@dataclass(frozen=True)
class Rule:
    """Tolerance for one metric: allowed |delta| = max(abs, rel * |baseline|, stderr_k * max(stderr))."""

    rel: float = 0.0
    abs: float = 0.0
    stderr_k: float = 0.0
    direction: str = "none"          # which way is better; "none" = any change beyond tolerance is "changed"
    allow_improvement: bool = False  # an improvement beyond tolerance passes as "improved"
    machine_dependent: bool = False  # wall-clock numbers: skipped by --skip-timing or when devices differ
    ignore: bool = False             # reported, never gated

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction {self.direction!r} unknown; allowed: {list(DIRECTIONS)}")
        if min(self.rel, self.abs, self.stderr_k) < 0:
            raise ValueError("tolerances must be non-negative")


# Keys are "suite/metric", "metric", a glob "suite/pat*", "suite/*" or "*"; the most specific match wins
# (see docs/reports.md).
DEFAULT_TOLERANCES: dict[str, Rule] = {
    # Same weights + same eval tokens give the same ppl up to kernel/library numerics (~1e-4 relative).
    "ppl/ppl": Rule(rel=1e-3, direction="lower"),
    "ppl/tokens": Rule(direction="none"),
    "ppl/windows": Rule(direction="none"),
    "ppl/wall_s": Rule(ignore=True, machine_dependent=True),
    # A flipped example moves accuracy by 1/n; stderr ~ sqrt(p(1-p)/n) widens the band for small tasks.
    "lm_eval/*": Rule(abs=0.01, stderr_k=0.5, direction="higher"),
    "lm_eval/word_perplexity": Rule(rel=1e-3, direction="lower"),
    "lm_eval/byte_perplexity": Rule(rel=1e-3, direction="lower"),
    "lm_eval/bits_per_byte": Rule(rel=1e-3, direction="lower"),
    # CI machines differ: only a >25% slowdown fails, speedups always pass. Globs cover the
    # evaluator's names (prefill_tokens_per_s, ms_<backend>, speedup_<backend>_vs_dense, median_ms).
    "timing/*": Rule(rel=0.25, direction="none", machine_dependent=True),
    "timing/*tokens_per_s": Rule(rel=0.25, direction="higher", allow_improvement=True, machine_dependent=True),
    "timing/speedup*": Rule(rel=0.25, direction="higher", allow_improvement=True, machine_dependent=True),
    "timing/ms_*": Rule(rel=0.25, direction="lower", allow_improvement=True, machine_dependent=True),
    "timing/*_ms": Rule(rel=0.25, direction="lower", allow_improvement=True, machine_dependent=True),
    "quant/quant_wall_s": Rule(ignore=True, machine_dependent=True),
    "stage/*": Rule(ignore=True, machine_dependent=True),  # where a run's wall time went: reported, never gated
    # Determined by the config and the weights alone: must match exactly.
    "quant/storage_bits_per_weight": Rule(direction="none"),
    "quant/quantized_layers": Rule(direction="none"),
    "quant/short_group_layers": Rule(direction="none"),
    # A method's own statistics (GPTQ's damping, retries, loss): deterministic for given weights and data, up to
    # float summation order.
    "quant/stat_*": Rule(rel=1e-6, direction="none"),
    # The baseline comparison on the same tokens: same weights and tokens give the same values up to numerics.
    "ppl/base_ppl": Rule(rel=1e-3, direction="lower"),
    "ppl/ppl_ratio_vs_base": Rule(rel=1e-3, direction="lower"),
    "ppl/kld*": Rule(rel=1e-3, abs=1e-9, direction="lower"),
    "ppl/top1_agree": Rule(abs=1e-3, direction="higher"),
    "ppl/dp_*": Rule(rel=1e-3, abs=1e-7, direction="none"),
    # Packed model vs fake-quant on the probe window: bf16/fp16 kernels differ by CPU and GPU; the run itself
    # refuses a ratio outside 1 +- 0.01.
    "quant/packed_ppl_ratio": Rule(abs=0.01, direction="none", machine_dependent=True),
    # An unknown metric gets no slack: a new number must be given a rule deliberately.
    "*": Rule(direction="none"),
}


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------

def parse_tolerances(spec: dict) -> dict[str, Rule]:
    """{key: {field: value}} (the YAML shape) -> {key: Rule}, overriding the defaults entry by entry."""
    if not isinstance(spec, dict):
        raise ValueError("tolerances must be a mapping of metric -> {rel, abs, stderr_k, direction, ...}")
    allowed = {f.name for f in fields(Rule)}
    rules = {k: r for k, r in DEFAULT_TOLERANCES.items() if not any(_shadows(str(u), k) for u in spec)}
    for key, entry in spec.items():
        if not isinstance(entry, dict):
            raise ValueError(f"tolerance {key!r} must be a mapping, got {entry!r}")
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"tolerance {key!r}: unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        rules[str(key)] = Rule(**entry)
    return rules


def _shadows(user_key: str, default_key: str) -> bool:
    """A user's 'metric' replaces every default 'suite/metric', and 'suite/*' every default 'suite/...'."""
    if user_key == default_key:
        return True
    if user_key.endswith("/*"):
        return default_key.startswith(user_key[:-1])
    return user_key != "*" and "/" not in user_key and default_key.endswith("/" + user_key)


def load_tolerances(path: Path | None) -> tuple[dict[str, Rule], list[str]]:
    """Defaults merged with a YAML file (if any); also the keys the file named, for validation."""
    if path is None:
        return dict(DEFAULT_TOLERANCES), []
    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read tolerances {path}: {err}") from err
    return parse_tolerances(spec), [str(k) for k in spec]


def check_tolerance_keys(keys: list[str], *frames: pd.DataFrame) -> None:
    """Reject tolerance keys naming a metric or suite that neither the defaults nor the results know (typos)."""
    names = set(KNOWN_METRICS)
    for frame in frames:
        names |= set(frame["metric"].dropna()) | {f"{s}/{m}" for s, m in zip(frame["suite"], frame["metric"])}
    unknown = [k for k in keys if k not in DEFAULT_TOLERANCES and not any(fnmatchcase(n, k) for n in names)]
    if unknown:
        raise ValueError(f"unknown metric(s) in tolerances: {unknown}; results have: {sorted(names)}")


def rule_for(rules: dict[str, Rule], suite: str, metric: str) -> Rule:
    """The most specific rule: suite/metric, metric, the longest matching glob, suite/*, then *."""
    for key in (f"{suite}/{metric}", metric):
        if key in rules:
            return rules[key]
    globs = [k for k in rules if "*" in k and k not in (f"{suite}/*", "*") and fnmatchcase(f"{suite}/{metric}", k)]
    if globs:
        return rules[max(globs, key=len)]
    for key in (f"{suite}/*", "*"):
        if key in rules:
            return rules[key]
    return Rule()


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------

def _key_strings(frame: pd.DataFrame) -> pd.Series:
    # Missing key values (fp bits, per-channel group) must match each other, so compare their text.
    text = frame[ROW_KEYS].astype(object).where(frame[ROW_KEYS].notna(), NA_TEXT).astype(str)
    return text.agg("|".join, axis=1)


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    rows, _ = latest_per_key(frame, REGRESS_KEYS)
    return rows.assign(_key=_key_strings(rows))[ROW_KEYS + ["_key", "value", "stderr", "device"]]


def _tolerance(rule: Rule, base: float, se_b: float, se_c: float) -> float:
    stderr = max((s for s in (se_b, se_c) if not pd.isna(s)), default=0.0)
    return max(rule.abs, rule.rel * abs(base), rule.stderr_k * stderr)


def judge(rule: Rule, base: float, cur: float, tol: float, allow_improvements: bool) -> str:
    """Status of one matched row: ok, regression, changed, improved or ignored."""
    if rule.ignore:
        return "ignored"
    if pd.isna(base) and pd.isna(cur):
        return "ok"
    if pd.isna(base) or pd.isna(cur):
        return "changed"
    delta = cur - base
    # A hair of slack so a delta exactly at the tolerance is not failed by float rounding.
    if abs(delta) <= tol * (1 + 1e-9) + 1e-12 * abs(base):
        return "ok"
    if rule.direction == "none":
        return "changed"
    worse = delta > 0 if rule.direction == "lower" else delta < 0
    if worse:
        return "regression"
    return "improved" if (rule.allow_improvement or allow_improvements) else "changed"


def _skip_reason(rule: Rule, skip_timing: bool, dev_b, dev_c) -> str | None:
    if not rule.machine_dependent or rule.ignore:
        return None
    if skip_timing:
        return "timing skipped"
    if not pd.isna(dev_b) and not pd.isna(dev_c) and dev_b != dev_c:
        return f"device differs ({dev_b} vs {dev_c})"
    return None


def compare(baseline: pd.DataFrame, current: pd.DataFrame, tolerances: dict[str, Rule] | None = None,
            allow_improvements: bool = False, skip_timing: bool = False,
            noise_level: float | None = None) -> pd.DataFrame:
    """One row per key of either side: ROW_KEYS, baseline, current, delta, tolerance, status, note.

    noise_level (e.g. 0.95): the interval-aware mode, for results from different machines or thread counts. A
    change beyond tolerance is judged only when it is also significant at that level, |delta| > z * sqrt(se_b^2 +
    se_c^2) with the rows' standard errors; otherwise it passes as "within noise". None: the exact gate."""
    rules = DEFAULT_TOLERANCES if tolerances is None else tolerances
    merged = _keyed(baseline).merge(_keyed(current), on="_key", how="outer", suffixes=("_b", "_c"),
                                    indicator=True, sort=True)
    # Key columns column-wise (not via records) so nullable integers stay integers.
    keys = pd.DataFrame({k: merged[k + "_b"].where(merged["_merge"] != "right_only", merged[k + "_c"])
                         for k in ROW_KEYS})
    judged = [_judge_row(row, rules, allow_improvements, skip_timing, noise_level) for row in merged.to_dict("records")]
    verdict = pd.DataFrame(judged, columns=["tolerance", "status", "note"], index=merged.index)
    return keys.assign(baseline=merged["value_b"], current=merged["value_c"],
                       delta=merged["value_c"] - merged["value_b"], **verdict)


def _judge_row(row: dict, rules: dict[str, Rule], allow_improvements: bool, skip_timing: bool,
               noise_level: float | None = None) -> tuple:
    """(tolerance, status, note) of one outer-merged row."""
    if row["_merge"] == "left_only":
        return math.nan, "missing", ""
    if row["_merge"] == "right_only":
        return math.nan, "extra", ""
    rule = rule_for(rules, row["suite_b"], row["metric_b"])
    if rule.ignore:
        return math.nan, "ignored", "not gated"
    base, cur = row["value_b"], row["value_c"]
    tol = _tolerance(rule, base, row["stderr_b"], row["stderr_c"])
    skip = _skip_reason(rule, skip_timing, row["device_b"], row["device_c"])
    status = "ignored" if skip else judge(rule, base, cur, tol, allow_improvements)
    if noise_level is not None and status in FAILING + ("improved",) and _within_noise(row, cur - base, noise_level):
        return tol, "ok", "within noise"
    return tol, status, skip or ""


def _within_noise(row: dict, delta: float, level: float) -> bool:
    """True when |delta| is inside the two rows' combined interval (both must carry a standard error)."""
    from scipy.stats import norm

    se_b, se_c = row.get("stderr_b"), row.get("stderr_c")
    if se_b is None or se_c is None or pd.isna(se_b) or pd.isna(se_c):
        return False
    return abs(delta) <= norm.ppf((1 + level) / 2) * math.hypot(se_b, se_c)


def failed(diff: pd.DataFrame) -> bool:
    """True when any row is a regression, a changed result, or missing from current."""
    return bool(diff["status"].isin(FAILING).any())


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def key_text(row: pd.Series) -> str:
    """'model method w4 g128 sym=False calib=wiki/128x512 seed=0 :: ppl/wiki/ppl'."""
    def shown(v):
        return NA_TEXT if pd.isna(v) else str(v)
    calib = "" if pd.isna(row["calib_source"]) else \
        f" calib={row['calib_source']}/{shown(row['calib_samples'])}x{shown(row['calib_seqlen'])}"
    sym = "" if pd.isna(row["symmetric"]) else f" sym={row['symmetric']}"
    return (f"{row['model']} {method_label(row['method'], row['bits'], row['group_size'])}{sym}{calib} "
            f"seed={shown(row['seed'])} :: "
            f"{row['suite']}/{row['task']}/{row['metric']}")


def _num(value: float, signed: bool = False) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:+.6g}" if signed else f"{value:.6g}"


def diff_table(diff: pd.DataFrame) -> str:
    """Fixed-width text table: key, baseline, current, delta, tolerance, status (+ note)."""
    header = ["key", "baseline", "current", "delta", "tolerance", "status"]
    body = [[key_text(r), _num(r["baseline"]), _num(r["current"]), _num(r["delta"], signed=True),
             _num(r["tolerance"]), r["status"] + (f" ({r['note']})" if r["note"] else "")]
            for _, r in diff.iterrows()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def summary(diff: pd.DataFrame) -> str:
    """'PASS: 40 rows compared (38 ok, 2 extra)' or 'FAIL: ...'."""
    counts = diff["status"].value_counts()
    parts = ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index))
    return f"{'FAIL' if failed(diff) else 'PASS'}: {len(diff)} rows ({parts})"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _load(path: str, what: str) -> pd.DataFrame:
    frame = load_results(path)
    if frame.empty:
        raise ValueError(f"no finished runs under {what} {path}")
    _, superseded = latest_per_key(frame, REGRESS_KEYS)
    if not superseded.empty:
        print(f"note: {what}: {len(superseded)} duplicate rows superseded (latest started_at wins): runs "
              f"{', '.join(sorted(superseded['run_id'].astype(str).unique()))}", file=sys.stderr)
    return frame


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m analysis.regress --baseline DIR --current DIR [--tolerances YAML]."""
    parser = argparse.ArgumentParser(prog="python -m analysis.regress", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="baseline results directory or glob")
    parser.add_argument("--current", required=True, help="current results directory or glob")
    parser.add_argument("--tolerances", type=Path, default=None, help="YAML overriding default tolerances")
    parser.add_argument("--allow-improvements", action="store_true",
                        help="improvements beyond tolerance pass (status 'improved') instead of failing as 'changed'")
    parser.add_argument("--skip-timing", action="store_true", help="do not gate machine-dependent timing rows")
    parser.add_argument("--show-all", action="store_true", help="print every row, not only failing/improved/extra ones")
    parser.add_argument("--noise-level", type=float, default=None, metavar="LEVEL",
                        help="interval-aware mode (e.g. 0.95) for results from other machines or thread counts: a "
                             "change fails only when beyond tolerance AND significant at LEVEL (rows' stderrs)")
    args = parser.parse_args(argv)
    try:
        rules, user_keys = load_tolerances(args.tolerances)
        baseline, current = _load(args.baseline, "baseline"), _load(args.current, "current")
        check_tolerance_keys(user_keys, baseline, current)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    diff = compare(baseline, current, rules, args.allow_improvements, args.skip_timing, args.noise_level)
    shown = diff if args.show_all else diff[~diff["status"].isin(["ok", "ignored"])]
    if not shown.empty:
        print(diff_table(shown))
    print(summary(diff))
    return 1 if failed(diff) else 0


if __name__ == "__main__":
    sys.exit(main())

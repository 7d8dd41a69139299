"""Row keys of the tidy results, which row wins when a key repeats, and how a config is named for people.

Shared by analysis.report, analysis.regress and analysis.summary, so that a table, a plot legend, a diff line
and a sweep summary name the same config the same way (`awq w4 g128`, `rtn w3 per-channel`, `fp`).
"""
from __future__ import annotations

import pandas as pd

# Keys that always separate configs and are always part of a config's name.
PRIMARY_KEYS = ["method", "bits", "group_size"]
# Keys that only split table rows (and lengthen names) when they actually vary.
SECONDARY_KEYS = ["symmetric", "calib_source", "calib_samples", "calib_seqlen", "calib_seed", "seed"]
CONFIG_KEYS = ["model", *PRIMARY_KEYS, *SECONDARY_KEYS]
# Where runs share every config key above but not their result key (the run hash: everything that changes the numbers,
# e.g. export=gptq's fp16 scales, another eval setting), a report names what sets each apart in this column
# (analysis.report.select.with_variants); it exists only in frames a report built.
VARIANT = "variant"
LABEL_KEYS = [*SECONDARY_KEYS, VARIANT]
OBS_KEYS = ["suite", "task", "metric"]
ROW_KEYS = CONFIG_KEYS + OBS_KEYS
# A model is its unquantized weights, not its name: rows of different fingerprints never supersede each other.
# (Every run of one base model, fp and quantized, carries the fingerprint taken before quantization.)
FINGERPRINT = "model_fingerprint"
# A row supersedes another only when it measured the same thing: same keys, same model, and the same run hash
# (config_hash: harness/identity.py's result key, everything that can change the numbers). A re-run of one
# configuration keeps its hash; runs that differ in anything else (an export, an eval setting) both stay.
SUPERSEDE_KEYS = ROW_KEYS + [FINGERPRINT, "config_hash"]
FINGERPRINT_TAG = 8  # hex digits of the fingerprint that tell two models of one name apart (more if they collide)
REFERENCE_METHOD = "fp"
# Table headers for the secondary keys (distinct from the raw column names so both can live in one frame).
DISPLAY = {"symmetric": "Sym", "calib_source": "Calib", "calib_samples": "Samples", "calib_seqlen": "Seqlen",
           "calib_seed": "Draw", "seed": "Seed", VARIANT: "Variant"}
DASH = "—"


def config_keys(frame: pd.DataFrame) -> list[str]:
    """The keys that tell configs apart in `frame`: CONFIG_KEYS, and the variant where a report added it."""
    return CONFIG_KEYS + ([VARIANT] if VARIANT in frame else [])


def latest_per_key(frame: pd.DataFrame, keys: list[str] = SUPERSEDE_KEYS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep one row per key (latest started_at wins, run_id breaks ties); also return the superseded rows. The default
    key includes the model fingerprint, so a run of another model never supersedes one of the same name."""
    frame = frame.reset_index(drop=True)  # concatenated inputs repeat index labels; later joins need them unique
    started = pd.to_datetime(frame["started_at"], utc=True, errors="coerce", format="ISO8601")
    # Unparseable/missing timestamps sort first so any dated run supersedes them.
    order = frame.assign(_t=started).sort_values(["_t", "run_id"], na_position="first", kind="stable")
    dup = order.duplicated(subset=keys, keep="last")
    return order.loc[~dup].drop(columns="_t"), order.loc[dup].drop(columns="_t")


def distinct_model_names(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """`frame` with every model name that covers several unquantized models (different model_fingerprint, a missing
    one counting as its own) shown as 'name (first hex digits of the fingerprint)', so no table merges them; and a
    warning per renamed model, keyed by its new name."""
    prints = frame[FINGERPRINT].astype(object).where(frame[FINGERPRINT].notna(), "").astype(str)
    shown = frame["model"].astype(object).copy()
    warnings: dict[str, str] = {}
    for name, group in prints.groupby(frame["model"].astype(str), sort=True):
        distinct = sorted(set(group))
        if len(distinct) < 2:
            continue
        tags = _fingerprint_tags(distinct)
        shown[group.index] = [f"{name} ({tags[p]})" for p in group]
        text = (f"model name {name!r} covers {len(distinct)} different models (model_fingerprint "
                f"{', '.join(p or 'missing' for p in distinct)}); kept apart as "
                f"{', '.join(repr(f'{name} ({tags[p]})') for p in distinct)}; set model.name to name them")
        warnings.update({f"{name} ({tags[p]})": text for p in distinct})
    return frame.assign(model=shown), warnings


def _fingerprint_tags(prints: list[str]) -> dict[str, str]:
    """The shortest prefix (FINGERPRINT_TAG hex digits or more) that tells the fingerprints apart."""
    n = FINGERPRINT_TAG
    while len({p[:n] for p in prints}) < len(prints):
        n += FINGERPRINT_TAG
    return {p: p[:n] if p else "no fingerprint" for p in prints}


def is_reference(frame: pd.DataFrame) -> pd.Series:
    """Rows of the unquantized reference run."""
    return frame["method"] == REFERENCE_METHOD


def value_text(value, missing: str = DASH) -> str:
    """A key value as text, `missing` for a missing one."""
    return missing if pd.isna(value) else str(value)


def rate_text(rate: float) -> str:
    """A speed or ratio for people: whole numbers from 100 up, else three significant figures, so that a slow
    runtime's 0.18 tok/s (or 0.0006 of its bound) does not print as 0 (the report's and bench_runtimes' tables)."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def group_text(method: str, group_size) -> str:
    """'128', 'per-channel', or the dash for the reference (which has no groups)."""
    # Missing group size means per-channel for a quantized method and "not applicable" for fp.
    if method == REFERENCE_METHOD:
        return DASH
    return "per-channel" if pd.isna(group_size) else str(group_size)


def method_label(method: str, bits, group_size) -> str:
    """'awq w4 g128', 'rtn w3 per-channel', 'fp'; a missing bits value is left out."""
    text = str(method) if pd.isna(bits) else f"{method} w{bits}"
    group = group_text(method, group_size)
    if group == DASH:
        return text
    return f"{text} {group}" if group == "per-channel" else f"{text} g{group}"


def label_columns(frame: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    """Display columns (Method, Bits, Group, then each varying key) as strings, in a paper-friendly row order."""
    labels = pd.DataFrame({
        "Method": frame["method"],
        "Bits": frame["bits"].map(value_text),
        "Group": [group_text(m, g) for m, g in zip(frame["method"], frame["group_size"])],
    }, index=frame.index)
    for key in extra:
        labels[DISPLAY[key]] = frame[key].map(value_text)
    # fp first, then method name, more bits first, per-channel before grouped, larger groups first.
    sort = pd.DataFrame({
        "ref": ~is_reference(frame), "method": frame["method"],
        "bits": -frame["bits"].astype("Float64").fillna(99), "gs": -frame["group_size"].astype("Float64").fillna(1e9),
    }, index=frame.index)
    for key in extra:
        sort[key] = labels[DISPLAY[key]]
    return labels.loc[sort.sort_values(list(sort.columns), kind="stable").index]


def config_label(frame: pd.DataFrame, extra: list[str]) -> pd.Series:
    """One short string per row naming its config, e.g. 'awq w4 g128' or 'fp', plus 'calib=wiki' etc. for `extra`."""
    labels = label_columns(frame, extra)
    rows = frame.loc[labels.index]
    text = pd.Series([method_label(m, b, g) for m, b, g in zip(rows["method"], rows["bits"], rows["group_size"])],
                     index=labels.index, dtype=labels["Method"].dtype)
    for key in extra:
        shown = labels[DISPLAY[key]]
        text = text.where(shown == DASH, text + (" " if key == VARIANT else f" {DISPLAY[key].lower()}=") + shown)
    return text


def label_row_names(labels: pd.DataFrame) -> pd.Series:
    """Names for the rows of a label_columns() frame, as config_label writes them: 'awq w4 g128', 'fp',
    plus ' calib=wiki' etc. for each display column past Method/Bits/Group that is not the dash."""
    names = []
    for row in labels.itertuples(index=False):
        fields = dict(zip(labels.columns, row))
        text = str(fields["Method"]) if fields["Bits"] == DASH else f"{fields['Method']} w{fields['Bits']}"
        group = fields["Group"]
        if group != DASH:
            text += f" {group}" if group == "per-channel" else f" g{group}"
        for column in labels.columns[3:]:
            if fields[column] != DASH:
                name = "" if column == DISPLAY[VARIANT] else f"{str(column).lower()}="
                text += f" {name}{fields[column]}"
        names.append(text)
    return pd.Series(names, index=labels.index, dtype=object)

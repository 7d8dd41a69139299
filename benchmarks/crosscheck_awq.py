"""Cross-check methods/awq.py against AutoAWQ 0.2.9 on the packaged SmolLM2-135M (a benchmark, not a test).

Both implementations get the same calibration windows; each quantizes in its own spawned process (so the
peak resident memory of one does not leak into the other) and both results are evaluated through this
project's fake-quant path (AutoAWQ's quantized forward needs CUDA): AutoAWQ runs with export_compatible=True
(search, scale, clip; weights stay fp) and its weights are then quantized with the same min/max quantizer.

Run with the AutoAWQ venv (scripts/setup_awq_reference.sh), from the repository root:
    /work/venv-awq/bin/python benchmarks/crosscheck_awq.py --specs w4g64 w3g64
`--export-check` instead writes our AWQ GEMM checkpoint and reads it with AutoAWQ's unpacking (seconds with
`--max-blocks 2`): the integer codes and zeros must be ours.
Specs whose group size does not divide every layer (w3g128 on hidden 576) run ours and RTN only: AutoAWQ asserts.
`--max-blocks K` quantizes only the first K decoder blocks with every method (the rest stay fp): AutoAWQ's
element-wise clip search takes minutes per block on a shared CPU.

Shims applied to AutoAWQ at runtime (installed files untouched), both needed for a correct CPU run with
transformers 5:
- its captured layer kwargs include the DynamicCache of the catcher pass (`past_key_values`); every later
  block forward would append keys/values to it, so it is dropped and `use_cache=False` set;
- `_compute_best_scale` snapshots weights with `{k: v.cpu()}`, a copy on GPU but an alias on CPU, and then
  scales the weights in place: on CPU every trial compounds the previous trial's scale and the model is no
  longer equivalent after the search. The inspected module's `state_dict` is made to return clones.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from harness.provenance import cpu_seconds, peak_rss_mb, reset_peak_rss, rss_mb

ROOT = Path(__file__).resolve().parents[1]


def parse_spec(tag: str):
    """'w4g64' -> QuantSpec(4, 64); 'w4gC' -> per-channel."""
    from core.spec import QuantSpec

    m = re.fullmatch(r"w(\d)g(\d+|C)", tag)
    if m is None:
        raise ValueError(f"--specs entry {tag!r}: expected w<bits>g<group size>, e.g. w4g64 or w3gC")
    return QuantSpec(int(m.group(1)), None if m.group(2) == "C" else int(m.group(2)))


def _load(device):
    from harness.config import ModelConfig
    from harness.models import load_model

    return load_model(ModelConfig(), device)


def _blocks_state(model, layout) -> dict:
    return {k: v.clone() for k, v in layout.blocks(model).state_dict().items()}


# --------------------------------------------------------------------------------------------- workers

def _truncate(model, layout, max_blocks: int | None) -> None:
    """Keep only the first max_blocks decoder blocks (CPU budget); the parent evaluates them inside the full model."""
    if max_blocks is not None:
        del layout.blocks(model)[max_blocks:]


def worker_ours(tag: str, calib: torch.Tensor, threads: int, max_blocks: int | None, out_path: str,
                batch_size: int = 8) -> None:
    """Quantize with methods/awq.py; write fake-quant block weights, scales, clips, wall time and memory."""
    torch.set_num_threads(threads)
    from structure.architectures import apply_artifacts, layout_for
    from methods.awq import AWQ, SEARCH_FILE, AWQConfig, AWQSearch

    spec = parse_spec(tag)
    model, _ = _load(torch.device("cpu"))
    layout = layout_for(model)
    _truncate(model, layout, max_blocks)
    rss0 = rss_mb()
    reset_peak_rss()
    # batch_size: ours runs at its default (8 samples per forward) unless --batch-size says otherwise; AutoAWQ runs
    # all samples in one forward (--batch-size N mirrors it: the same GEMM shapes, but 100 MB temporaries per forward
    # at 32 x 512, which cost ours 23% in page faults on this machine)
    method = AWQ(AWQConfig(batch_size=batch_size))
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = method.quantize(model, layout, spec, calib, torch.device("cpu"))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = peak_rss_mb()
    apply_artifacts(model, result.artifacts)
    search = AWQSearch.from_state(result.extras[SEARCH_FILE])
    scales = {f"{prefix}.{g.prev}": g.s for prefix, b in search.blocks.items() for g in b.scales}
    clips = {f"{prefix}.{n}": v for prefix, b in search.blocks.items() for n, v in b.clips.items()}
    torch.save({"state": _blocks_state(model, layout), "scales": scales, "clips": clips, "wall_s": wall, "cpu_s": cpu,
                "rss_base_mb": rss0, "rss_peak_mb": peak}, out_path)


def _autoawq_shims(quantizer_cls):
    """Wrap AutoAWQ's per-group search so weights are snapshotted by copy (see module docstring); records results."""
    record = {"scales": {}, "clips": {}}
    search_scale, search_clip = quantizer_cls._search_best_scale, quantizer_cls._search_best_clip

    def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
        inspect_module = module2inspect if module2inspect is not None else layers[0]
        state_dict = inspect_module.state_dict
        inspect_module.state_dict = lambda *a, **k: {n: t.clone() for n, t in state_dict(*a, **k).items()}
        try:
            result = search_scale(self, module, prev_op, layers, inp, module2inspect, kwargs)
        finally:
            del inspect_module.state_dict
        record["scales"][(id(module), result[0])] = result[2]
        return result

    def _search_best_clip(self, layer, named_linears, input_feat):
        clips = search_clip(self, layer, named_linears, input_feat)
        for name, max_val in clips:
            record["clips"][(id(layer), name)] = max_val
        return clips

    quantizer_cls._search_best_scale = _search_best_scale
    quantizer_cls._search_best_clip = _search_best_clip
    return record


def worker_theirs(tag: str, calib: torch.Tensor, threads: int, max_blocks: int | None, out_path: str) -> None:
    """Quantize with AutoAWQ 0.2.9 (export_compatible: search + apply only), then min/max fake-quantize."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from awq.models.llama import LlamaAWQForCausalLM
    from awq.quantize.quantizer import AwqQuantizer

    from structure.architectures import layout_for
    from core.quant import fake_quantize

    class SmolLM2AWQ(LlamaAWQForCausalLM):  # the static helpers only; the model object is ours
        model_type = "llama"

    spec = parse_spec(tag)
    model, tokenizer = _load(torch.device("cpu"))
    layout = layout_for(model)
    _truncate(model, layout, max_blocks)
    record = _autoawq_shims(AwqQuantizer)
    rss0 = rss_mb()
    reset_peak_rss()
    t0, c0 = time.perf_counter(), cpu_seconds()
    # Token windows go in as lists of ids: get_calib_dataset concatenates and re-splits them into the same windows.
    quantizer = AwqQuantizer(SmolLM2AWQ, model, tokenizer, spec.bits, spec.group_size, True, "gemm", calib.tolist(),
                             None, "text", duo_scaling=True, export_compatible=True,
                             max_calib_samples=calib.shape[0], max_calib_seq_len=calib.shape[1])
    quantizer.module_kwargs.pop("past_key_values", None)  # shim: never grow a KV cache across block forwards
    quantizer.module_kwargs["use_cache"] = False
    if tuple(quantizer.inps.shape[:2]) != tuple(calib.shape):
        raise RuntimeError(f"AutoAWQ saw calibration {tuple(quantizer.inps.shape[:2])}, expected {tuple(calib.shape)}")
    quantizer.quantize()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = peak_rss_mb()
    blocks = layout.blocks(model)
    index = {id(b): layout.block_prefix(i) for i, b in enumerate(blocks)}
    with torch.no_grad():
        for lin in layout.quantizable_linears(model).values():
            lin.weight.data = fake_quantize(lin.weight.data, spec, "minmax")
    torch.save({"state": _blocks_state(model, layout),
                "scales": {f"{index[b]}.{name}": s for (b, name), s in record["scales"].items()},
                "clips": {f"{index[b]}.{name}": v.reshape(v.shape[0], -1) for (b, name), v in record["clips"].items()},
                "wall_s": wall, "cpu_s": cpu, "rss_base_mb": rss0, "rss_peak_mb": peak}, out_path)


def run_worker(fn, tag, calib, threads, max_blocks, tmp_dir, *extra) -> dict:
    out_path = os.path.join(tmp_dir, f"{fn.__name__}-{tag}.pt")
    proc = mp.get_context("spawn").Process(target=fn, args=(tag, calib, threads, max_blocks, out_path, *extra))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} {tag} failed with exit code {proc.exitcode}")
    return torch.load(out_path, weights_only=True)


# ------------------------------------------------------------------------------------------ evaluation

def evaluate(model, layout, state, windows, device) -> dict[str, float]:
    from harness.perplexity import perplexity
    from structure.pipeline import BlockPipeline

    if state is not None:
        layout.blocks(model).load_state_dict(state, strict=True)
    pipeline = BlockPipeline(model, layout, device)
    return {name: perplexity(pipeline, w, desc=f"ppl {name}")["ppl"] for name, w in windows.items()}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-30))


def compare_search(ours: dict, theirs: dict) -> dict:
    """Per-group scale correlation and max relative difference; clip agreement."""
    rows = []
    for key, s in ours["scales"].items():
        t = theirs["scales"][key]
        rows.append({"group": key, "corr": pearson(s, t), "max_rel_diff": float(((s - t).abs() / t.abs()).max())})
    clip_rel, clip_same = [], []
    for key, v in theirs["clips"].items():
        clip_rel.append(float(((ours["clips"][key] - v).abs() / v.abs().clamp(min=1e-12)).max()))
        clip_same.append(float(torch.isclose(ours["clips"][key], v, rtol=1e-4).float().mean()))
    return {"groups": rows, "clip_max_rel_diff": max(clip_rel), "clip_frac_equal": statistics.mean(clip_same)}


def export_check(tags: list[str], calib: torch.Tensor, threads: int, max_blocks: int | None) -> None:
    """Our AWQ GEMM export read back by AutoAWQ's own unpacking: its integer codes and zeros must be ours,
    and its fp16 dequantization must equal ours computed in fp16 from the fp16 scales it stores."""
    torch.set_num_threads(threads)
    from awq.utils.packing_utils import dequantize_gemm, reverse_awq_order, unpack_awq
    from safetensors.torch import load_file

    from structure.architectures import apply_artifacts, layout_for
    from kernels.export import WEIGHTS_FILE, save_quantized
    from methods.awq import AWQ, AWQConfig

    print(f"{'spec':6} {'layers':>6} {'codes equal':>11} {'zeros equal':>11} {'W equal (fp16 math)':>19} "
          f"{'max rel |W_autoawq - W_ours fp32|':>33}")
    for tag in tags:
        spec = parse_spec(tag)
        model, tokenizer = _load(torch.device("cpu"))
        layout = layout_for(model)
        _truncate(model, layout, max_blocks)
        artifacts = AWQ(AWQConfig()).quantize(model, layout, spec, calib, torch.device("cpu")).artifacts
        apply_artifacts(model, artifacts)
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(model, artifacts, Path(tmp) / "ckpt", "awq_gemm", spec, tokenizer)
            tensors = load_file(str(Path(tmp) / "ckpt" / WEIGHTS_FILE))
        codes_ok = zeros_ok = weights_ok = 0
        max_rel = 0.0
        for name, art in artifacts.items():
            qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
            iweight, izeros = reverse_awq_order(*unpack_awq(qweight, qzeros, spec.bits), spec.bits)
            mask = 2**spec.bits - 1
            codes_ok += torch.equal(torch.bitwise_and(iweight, mask).to(torch.uint8), art.codes.t())
            zeros_ok += torch.equal(torch.bitwise_and(izeros, mask).to(torch.uint8), art.zeros.t())
            w_theirs = dequantize_gemm(qweight, qzeros, scales, spec.bits, spec.group_size)  # fp16, as AutoAWQ does
            g = art.group_index()
            w_fp16 = ((art.codes.float() - art.zeros.float()[:, g]).half() * art.scales.half()[:, g]).t()
            weights_ok += torch.equal(w_theirs, w_fp16)
            w_ours = art.dequantize().t()
            max_rel = max(max_rel, ((w_theirs.float() - w_ours).abs() / w_ours.abs().max()).max().item())
        n = len(artifacts)
        print(f"{tag:6} {n:6d} {f'{codes_ok}/{n}':>11} {f'{zeros_ok}/{n}':>11} {f'{weights_ok}/{n}':>19} "
              f"{max_rel:33.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+", default=["w4g64", "w3g64"])
    parser.add_argument("--calib-source", default="wiki")
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="ours: calibration samples per forward (our default 8; AutoAWQ always runs all at once)")
    parser.add_argument("--max-blocks", type=int, default=None,
                        help="quantize only the first K decoder blocks (the rest stay fp) to fit a CPU budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results" / "crosscheck_awq"))
    parser.add_argument("--export-check", action="store_true",
                        help="only: read our AWQ GEMM export with AutoAWQ's unpacking and compare codes and weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from structure.architectures import layout_for
    from harness.config import DataConfig
    from harness.data import calibration_tokens, eval_tokens
    from harness.models import PACKAGED_NOTE, default_cache_dir
    from harness.perplexity import make_windows
    from methods.rtn import RTN, RTNConfig

    device = torch.device("cpu")
    cache = default_cache_dir()
    sources = DataConfig().sources
    model, tokenizer = _load(device)
    layout = layout_for(model)
    fp_state = _blocks_state(model, layout)
    calib = calibration_tokens(args.calib_source, sources[args.calib_source], tokenizer, cache, args.calib_samples,
                               args.calib_seqlen, args.seed).tokens
    windows = {name: make_windows(eval_tokens(name, sources[name], tokenizer, cache,
                                              args.eval_windows * args.eval_seqlen).tokens,
                                  args.eval_seqlen, args.eval_windows, None)
               for name in ("wiki", "code", "prose")}
    budget = (f"CPU budget: calibration {args.calib_samples} x {args.calib_seqlen} tokens ({args.calib_source}, "
              f"seed {args.seed}); eval {args.eval_windows} windows x {args.eval_seqlen} tokens per set; "
              f"{args.threads} thread(s) per process; ours {args.batch_size} samples per forward; quantized blocks: "
              f"{'all' if args.max_blocks is None else f'first {args.max_blocks} (rest fp)'}. "
              f"Model: SmolLM2-135M-Instruct, {PACKAGED_NOTE}.")
    print(budget)
    if args.export_check:
        export_check(args.specs, calib, args.threads, args.max_blocks)
        return
    fp_ppl = evaluate(model, layout, None, windows, device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for tag in args.specs:
            spec = parse_spec(tag)
            autoawq_ok = spec.group_size is not None and all(
                lin.in_features % spec.group_size == 0 for lin in layout.quantizable_linears(model).values())
            layout.blocks(model).load_state_dict(fp_state)
            rtn = RTN(RTNConfig()).quantize(model, layout, spec, None, device).artifacts
            if args.max_blocks is not None:
                keep = {layout.block_prefix(i) + "." for i in range(args.max_blocks)}
                rtn = {k: a for k, a in rtn.items() if any(k.startswith(p) for p in keep)}
            rtn_ppl = evaluate(model, layout, {**fp_state, **{k[len(layout.spec.blocks) + 1:] + ".weight":
                                                                a.dequantize() for k, a in rtn.items()}},
                               windows, device)
            ours = run_worker(worker_ours, tag, calib, args.threads, args.max_blocks, tmp, args.batch_size)
            ours_ppl = evaluate(model, layout, {**fp_state, **ours["state"]}, windows, device)
            theirs = run_worker(worker_theirs, tag, calib, args.threads, args.max_blocks, tmp) if autoawq_ok else None
            theirs_ppl = (evaluate(model, layout, {**fp_state, **theirs["state"]}, windows, device)
                          if theirs else None)
            report = {"spec": tag, "budget": budget, "ppl": {"fp": fp_ppl, "rtn": rtn_ppl, "ours": ours_ppl,
                                                               "autoawq": theirs_ppl},
                      "wall_s": {"ours": ours["wall_s"], "autoawq": theirs and theirs["wall_s"]},
                      "cpu_s": {"ours": ours["cpu_s"], "autoawq": theirs and theirs["cpu_s"]},
                      "rss_mb": {"ours": [ours["rss_base_mb"], ours["rss_peak_mb"]],
                                 "autoawq": theirs and [theirs["rss_base_mb"], theirs["rss_peak_mb"]]}}
            print(f"\n=== {tag} ===")
            print(f"{'set':8s} {'fp':>9s} {'rtn':>9s} {'ours':>9s} {'autoawq':>9s} {'ours/theirs':>11s} "
                  f"{'awq<rtn':>8s}")
            for name in windows:
                t = theirs_ppl[name] if theirs_ppl else float("nan")
                print(f"{name:8s} {fp_ppl[name]:9.3f} {rtn_ppl[name]:9.3f} {ours_ppl[name]:9.3f} {t:9.3f} "
                      f"{ours_ppl[name] / t:11.4f} {str(ours_ppl[name] < rtn_ppl[name]):>8s}")
            if theirs:
                print(f"quant wall s: ours {ours['wall_s']:.1f}  autoawq {theirs['wall_s']:.1f}  "
                      f"ratio ours/theirs {ours['wall_s'] / theirs['wall_s']:.3f}")
                print(f"quant CPU s (user+sys, robust to other load): ours {ours['cpu_s']:.1f}  autoawq "
                      f"{theirs['cpu_s']:.1f}  ratio ours/theirs {ours['cpu_s'] / theirs['cpu_s']:.3f}")
                print(f"peak RSS MB (after model load -> peak): ours {ours['rss_base_mb']:.0f} -> "
                      f"{ours['rss_peak_mb']:.0f}"
                      f"  autoawq {theirs['rss_base_mb']:.0f} -> {theirs['rss_peak_mb']:.0f}")
                cmp = compare_search(ours, theirs)
                report["search"] = cmp
                corr = [r["corr"] for r in cmp["groups"]]
                print(f"scale correlation ours vs autoawq over {len(corr)} groups: min {min(corr):.6f} "
                      f"median {statistics.median(corr):.6f}; "
                      f"max rel diff {max(r['max_rel_diff'] for r in cmp['groups']):.2e}")
                print(f"clip thresholds: fraction equal (rtol 1e-4) {cmp['clip_frac_equal']:.4f}, "
                      f"max rel diff {cmp['clip_max_rel_diff']:.2e}")
                print("per-layer scale correlation (block: input_layernorm, post_attention_layernorm, mlp.up_proj):")
                by_block: dict[str, list[str]] = {}
                for r in cmp["groups"]:
                    block = re.match(r"(.*?\.\d+)\.", r["group"]).group(1)
                    by_block.setdefault(block, []).append(f"{r['corr']:.6f}")
                for block, vals in by_block.items():
                    print(f"  {block:18s} {' '.join(vals)}")
            else:
                print(f"quant wall s: ours {ours['wall_s']:.1f}, CPU s {ours['cpu_s']:.1f} "
                      f"(AutoAWQ cannot run {tag}: group size does not divide "
                      f"every layer); peak RSS MB {ours['rss_base_mb']:.0f} -> {ours['rss_peak_mb']:.0f}")
            (out_dir / f"{tag}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

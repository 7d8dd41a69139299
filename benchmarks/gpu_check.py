"""The whole GPU validation in one process, run by scripts/gpu_check.sh; `--dry` runs the same code on CPU.

Sections, each writing a CSV under --out and a part of gpu_check.md:
1. kernels:   the Triton W4A16 kernel against the torch reference, M x group size x shapes (ragged included);
2. speed:     Triton W4A16 against torch's fp16 and bf16 dense matmul on 7B-class shapes, side by side in one
              process (kernels.microbench.gemm_microbench), plus the effective bandwidth at M=1 as a fraction of the
              measured device-to-device copy bandwidth;
3. e2e:       a random-weight Llama-family model built here (about 1B parameters), loaded through `model=hf`,
              quantized by RTN, GPTQ and AWQ at w4 g128 on device, packed (`kernel=triton`) and timed against the
              fp16 baseline (`+eval/timing=default`, batch 1 and 8);
4. agreement: CUDA against CPU on a tiny model: the artifacts of RTN, GPTQ and AWQ and the ppl on the same tokens.

`--dry` (no GPU: Triton's interpreter, tiny shapes, device=cpu for both sides of the agreement) exercises every
line so that the check cannot rot; its numbers say nothing about speed. Exit status 1 when a correctness or
agreement check fails (the files are written regardless).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Triton's interpreter must be chosen before kernels.triton_w4a16 is imported (it is read at kernel definition).
if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import pandas as pd  # noqa: E402
import torch  # noqa: E402

KERNEL_TOL = 5e-3  # max |y - ref| / max |ref|: fp16 activations and scales, fp32 accumulation (tests/test_kernels.py)
AGREE_CODES = 0.99  # fraction of identical integer codes CUDA vs CPU (float rounding may flip a code at a tie)
AGREE_PPL = 1e-3  # relative ppl difference CUDA vs CPU on the same tokens

FULL = dict(kernel_m=(1, 16, 128, 2048), kernel_shapes=((4096, 4096), (4160, 4104), (576, 1536), (200, 48)),
            groups=(32, 64, 128, None), speed_m=(1, 16, 128, 2048),
            speed_shapes=((4096, 4096), (4096, 11008), (11008, 4096)), copy_mib=1024,
            model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
            calib=(16, 512), eval_seqlen=512, timing=["eval.timing.batch_sizes=[1,8]"])
DRY = dict(kernel_m=(1, 16, 33), kernel_shapes=((200, 48), (96, 40)), groups=(32, 64, None), speed_m=(1, 16),
           speed_shapes=((128, 64),), copy_mib=8,
           model=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
           calib=(2, 32), eval_seqlen=32,
           timing=["eval.timing.prompt_len=8", "eval.timing.decode_tokens=2", "eval.timing.repeats=1",
                   "eval.timing.warmup=0"])


def environment(device: torch.device) -> dict:
    """Which GPU, driver and versions produced the figures."""
    import triton

    env = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["driver"] = smi.stdout.strip() or "unknown"
    else:
        env["gpu"] = "none (dry run: Triton interpreter on CPU)"
    return env


# ------------------------------------------------------------------------------------------------ 1. kernels
def check_kernels(p: dict, device: torch.device) -> pd.DataFrame:
    from kernels.microbench import random_artifact
    from kernels.pack import pack_triton_w4
    from kernels.reference import w4a16_reference
    from kernels.triton_w4a16 import w4a16_matmul

    rows = []
    for K, N in p["kernel_shapes"]:
        for G in p["groups"]:
            packed = {k: v.to(device) for k, v in pack_triton_w4(random_artifact(K, N, G)).items()}
            for M in p["kernel_m"]:
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(device, torch.float16)
                y = w4a16_matmul(x, packed["qweight"], packed["scales"], packed["zeros"], K)
                ref = w4a16_reference(x, packed["qweight"], packed["scales"], packed["zeros"], K)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                rows.append({"K": K, "N": N, "group_size": G or "channel", "M": M, "rel_err": err,
                             "ok": bool(err < KERNEL_TOL)})
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------- 2. speed
def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read and written (median of 10)."""
    from kernels.microbench import _time_sample, summarize

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = [_time_sample(lambda: dst.copy_(src), device, 5) for _ in range(10)]
    return 2 * src.numel() / summarize(samples)["median"] / 1e9


def check_speed(p: dict, device: torch.device) -> tuple[pd.DataFrame, float, pd.DataFrame]:
    """gemm_microbench rows (ms_triton, ms_dense (fp16), ms_dense_bf16, speedups) + bandwidth at M=1."""
    from harness.provenance import device_name
    from kernels.microbench import gemm_microbench

    rows = pd.DataFrame(gemm_microbench(list(p["speed_shapes"]), list(p["speed_m"]), 128, ["triton"], device,
                                        repeats=5, device_label=device_name(device)))
    detail = rows["detail"].map(json.loads)
    rows["M"], rows["K"], rows["N"] = detail.map(lambda d: d["M"]), detail.map(lambda d: d["in"]), detail.map(
        lambda d: d["out"])
    copy_gbs = copy_bandwidth(device, p["copy_mib"])
    m1 = rows[(rows.metric == "ms_triton") & (rows.M == 1)]
    moved = m1.K * m1.N / 2 + 2 * 2 * (m1.K / 128) * m1.N + 2 * (m1.K + m1.N)  # int4 codes, fp16 scales+zeros, x, y
    bandwidth = pd.DataFrame({"K": m1.K, "N": m1.N, "ms": m1.value, "GB_per_s": moved / (m1.value / 1e3) / 1e9})
    bandwidth["fraction_of_copy"] = bandwidth.GB_per_s / copy_gbs
    return rows.drop(columns=["detail"]), copy_gbs, bandwidth


# ---------------------------------------------------------------------------------------------------- 3. e2e
def build_model(directory: Path, config: dict, seed: int = 0) -> tuple[Path, Path]:
    """A random-weight Llama saved with save_pretrained (fp16), a word-level tokenizer over its vocabulary, and a
    text file of random words from that vocabulary (calibration and evaluation data)."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", tie_word_embeddings=False, **config)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(directory / "model")
    words = [f"w{i}" for i in range(config["vocab_size"] - 3)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory / "model")
    rng = random.Random(seed)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(400)) for _ in range(300))
    (directory / "corpus.txt").write_text(text)
    return directory / "model", directory / "corpus.txt"


def check_e2e(p: dict, device: torch.device, out: Path, dry: bool) -> pd.DataFrame:
    from analysis.results import load_results

    model_dir, corpus = build_model(out / "e2e_assets", p["model"])
    n, seqlen = p["calib"]
    args = [sys.executable, "-m", "harness", "-m", "model=hf", f"model.path={model_dir}", "model.name=llama-random",
            "model.dtype=float16" if device.type == "cuda" else "model.dtype=float32", f"device={device.type}",
            "method=rtn,gptq,awq", "bits=4", "group_size=128" if not dry else "group_size=32", "kernel=triton",
            f"data.sources.textfile.path={corpus}", "calib.source=textfile", f"calib.n_samples={n}",
            f"calib.seqlen={seqlen}", "eval.ppl_sets=[textfile]", f"eval.seqlen={p['eval_seqlen']}",
            "eval.max_windows=2", "eval.lm_eval=null", "+eval/timing=default", *p["timing"],
            f"results_dir={out / 'e2e_results'}", f"cache_dir={out / 'e2e_cache'}",
            f"hydra.sweep.dir={out / 'e2e_sweep'}"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=os.environ)
    (out / "e2e.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"e2e sweep failed after {time.perf_counter() - start:.0f}s; see {out / 'e2e.log'}")
    frame = load_results(out / "e2e_results")
    keep = frame.metric.isin(["quant_wall_s", "packed_ppl_ratio", "ppl"]) | frame.metric.str.contains("speedup")
    return frame[keep][["method", "suite", "task", "metric", "value"]].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- 4. agreement
def check_agreement(device: torch.device, cpu: torch.device) -> pd.DataFrame:
    """The same tiny model quantized on `device` and on `cpu`: fraction of identical codes, largest relative scale
    difference, and the ppl of the fake-quantized model on the same tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.spec import QuantSpec
    from harness.perplexity import perplexity
    from structure.pipeline import BlockPipeline
    from methods import build_method
    from methods.awq import AWQConfig
    from methods.gptq import GPTQConfig
    from methods.rtn import RTNConfig
    from structure.architectures import apply_artifacts, layout_for

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    calib, windows = torch.randint(0, 256, (8, 64), generator=gen), torch.randint(0, 256, (4, 64), generator=gen)
    rows = []
    for config in (RTNConfig(), GPTQConfig(), AWQConfig(batch_size=8)):
        runs = []
        for dev in (device, cpu):
            model = copy.deepcopy(base).to(dev)
            result = build_method(config).quantize(model, layout_for(model), QuantSpec(4, 32), calib, dev)
            apply_artifacts(model, result.artifacts)
            ppl = perplexity(BlockPipeline(model, layout_for(model), dev), windows)["ppl"]
            runs.append(({k: a.to("cpu") for k, a in result.artifacts.items()}, ppl))
        (a_arts, a_ppl), (b_arts, b_ppl) = runs
        same = sum(int((a_arts[k].codes == b_arts[k].codes).sum()) for k in a_arts)
        total = sum(a.codes.numel() for a in a_arts.values())
        scale = max(((a_arts[k].scales - b_arts[k].scales).abs() / b_arts[k].scales.abs()).max().item()
                    for k in a_arts)
        rows.append({"method": config.name, "codes_equal": same / total, "max_rel_scale_diff": scale,
                     "ppl_device": a_ppl, "ppl_cpu": b_ppl, "ppl_rel_diff": abs(a_ppl / b_ppl - 1),
                     "ok": bool(same / total >= AGREE_CODES and abs(a_ppl / b_ppl - 1) <= AGREE_PPL)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- summary
def markdown(env: dict, parts: dict[str, str]) -> str:
    lines = ["# GPU check", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in env.items()], ""]
    for title, body in parts.items():
        lines += [f"## {title}", "", body, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes (no GPU needed)")
    ap.add_argument("--sections", default="kernels,speed,e2e,agreement")
    args = ap.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry for the CPU rehearsal", file=sys.stderr)
        return 2
    p, device = (DRY, torch.device("cpu")) if args.dry else (FULL, torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    (args.out / "env.json").write_text(json.dumps(env, indent=2))
    sections, parts, ok = args.sections.split(","), {}, True
    if "kernels" in sections:
        k = check_kernels(p, device)
        k.to_csv(args.out / "kernels.csv", index=False)
        ok &= bool(k.ok.all())
        parts["Triton W4A16 vs torch reference"] = (f"{int(k.ok.sum())}/{len(k)} cases within {KERNEL_TOL}; largest "
                                                    f"relative error {k.rel_err.max():.2e}\n\n" +
                                                    k.sort_values("rel_err").tail(5).to_markdown(index=False))
    if "speed" in sections:
        speed, copy_gbs, bandwidth = check_speed(p, device)
        speed.to_csv(args.out / "speed.csv", index=False)
        bandwidth.to_csv(args.out / "bandwidth.csv", index=False)
        table = speed[speed.metric.str.startswith("speedup")].pivot_table(index=["K", "N"], columns=["metric", "M"],
                                                                          values="value")
        parts["Speedup (dense ms / Triton ms), M x shape"] = table.round(2).to_markdown()
        parts["Bandwidth at M=1"] = (f"measured copy bandwidth {copy_gbs:.0f} GB/s (read + write)\n\n" +
                                     bandwidth.round(3).to_markdown(index=False))
    if "e2e" in sections:
        e2e = check_e2e(p, device, args.out, args.dry)
        e2e.to_csv(args.out / "e2e.csv", index=False)
        parts["End to end (random-weight Llama, w4, kernel=triton)"] = e2e.pivot_table(
            index=["task", "metric"], columns="method", values="value").round(3).to_markdown()
    if "agreement" in sections:
        agree = check_agreement(device, torch.device("cpu"))
        agree.to_csv(args.out / "agreement.csv", index=False)
        ok &= bool(agree.ok.all())
        parts["CUDA vs CPU agreement (tiny Llama, w4 g32)" + (" [dry: CPU vs CPU]" if args.dry else "")] = \
            agree.to_markdown(index=False, floatfmt=".6g")
    (args.out / "gpu_check.md").write_text(markdown(env, parts))
    print(markdown(env, parts))
    print(f"gpu_check: {'PASS' if ok else 'FAIL'}; files in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Every mixture-of-experts family of the architecture table quantized on its tiny random model (the test suite's,
tests/conftest.py), in memory and streamed: per family and method, the matrices quantized, the expert matrices
against E x 3 x blocks with experts, the experts that fell back to round-to-nearest, whether the routers are
untouched, and whether the streamed run's artifacts equal the in-memory run's bit for bit.

    python benchmarks/moe_families.py                 # RTN, GPTQ, AWQ on all seven families (~1 min on 2 cores)

The tests (tests/test_moe.py) assert the same facts; this prints them as the table of docs/moe.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import MOE_FAMILIES, tiny_moe_model  # noqa: E402
from core.spec import QuantSpec  # noqa: E402
from methods import build_method  # noqa: E402
from methods.awq.config import AWQConfig  # noqa: E402
from methods.gptq import GPTQConfig  # noqa: E402
from methods.rtn import RTNConfig  # noqa: E402
from structure.architectures import layout_for  # noqa: E402
from structure.pipeline import BlockPipeline  # noqa: E402
from structure.streaming import load_streamed  # noqa: E402

CPU = torch.device("cpu")
SPEC = QuantSpec(4, 32)
METHODS = {"rtn": RTNConfig(), "gptq": GPTQConfig(), "awq": AWQConfig(n_grid=4, clip_grid=4, clip_n_tokens=64)}


def identical(a, b) -> bool:
    return sorted(a.artifacts) == sorted(b.artifacts) and all(
        torch.equal(getattr(a.artifacts[n], f), getattr(b.artifacts[n], f))
        for n in a.artifacts for f in ("codes", "scales", "zeros")) and sorted(a.modified) == sorted(b.modified) \
        and all(torch.equal(a.modified[n], b.modified[n]) for n in a.modified) and a.routing == b.routing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    print("| family | method | matrices quantized | expert matrices (E x 3 x MoE blocks) | experts fallen back | "
          "routers untouched | streamed = in memory |")
    print("|---|---|---:|---|---:|---|---|")
    for family in (*MOE_FAMILIES, "phi3"):
        with tempfile.TemporaryDirectory() as tmp:
            tiny_moe_model(family, seed=3).save_pretrained(Path(tmp) / "ckpt", max_shard_size="100KB")
            for method, config in METHODS.items():
                model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "ckpt", dtype=torch.float32).eval()
                layout = layout_for(model)
                moe = layout.spec.moe
                routers = {n: p.detach().clone() for n, p in model.named_parameters()
                           if moe is not None and n.endswith(f"{moe.experts.router}.weight")}
                result = build_method(config).quantize(model, layout, SPEC, calib, CPU)
                streamed, residency = load_streamed(Path(tmp) / "ckpt", torch.float32, CPU, Path(tmp) / method)
                got = build_method(config).quantize_blocks(BlockPipeline(streamed, layout_for(streamed), CPU,
                                                                         residency), SPEC, calib)
                experts = sum(".experts." in n for n in result.artifacts)
                if moe is None:
                    expected_text = "— (dense)"
                else:
                    n_experts = getattr(model.config, "num_local_experts", None) or getattr(
                        model.config, "num_experts", None) or model.config.n_routed_experts
                    blocks = len(result.routing) if result.routing else sum(
                        layout.parts(b).moe is not None for b in layout.blocks(model))
                    expected_text = f"{experts} = {n_experts} x 3 x {blocks}: {experts == n_experts * 3 * blocks}"
                fallen = {n.rpartition(".")[0] for n, s in result.stats.items() if s.get("fallback")}
                untouched = all(torch.equal(model.get_parameter(n), p) for n, p in routers.items())
                router_text = "—" if not routers else ("yes" if untouched else "scaled by AWQ's fold (routes as before)")
                print(f"| {family} | {method} | {len(result.artifacts)} | {expected_text} | {len(fallen)} | "
                      f"{router_text} | {'yes' if identical(result, got) else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

"""One runtime's paired speed measurement, run inside that runtime's own venv by benchmarks/bench_runtimes.py:
the quantized checkpoint and the unquantized baseline loaded in this one process, measured alternately, threads fixed.

    python benchmarks/runtime_worker.py RUNTIME --base BASE --quantized CKPT --threads 2 --prompt 128 --decode 32
        --repeats 3 --seed 0

RUNTIME: llamacpp (llama-cpp-python; BASE an F32/F16 GGUF), transformers (bitsandbytes' and torchao's CPU paths:
the checkpoint loaded by transformers' own quantizer on device_map="cpu"), quanto (QuantizedModelForCausalLM),
mlx (mlx-lm on MLX's CPU build). Prefill: one forward of a [1, prompt] random token prompt; decode: `decode`
one-token steps with the KV cache, each fed a predetermined token (the cost of greedy decoding without its argmax, the
same in every runtime). Prints one JSON line: {"baseline": {...}, "quantized": {...}}, each the median prefill and
decode tokens/s over the repeats. Imports nothing of the project (the venvs do not have it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def tokens(vocab: int, n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


# each loader returns run(prompt, steps) -> (prefill_s, decode_s)
def llamacpp(path: str, threads: int, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                          verbose=False)

    def run(prompt, steps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for token in steps:
            llm.eval([token])
        return t1 - t0, time.perf_counter() - t1

    return run, llm.n_vocab()


def torch_runner(model):
    import torch

    @torch.no_grad()
    def run(prompt, steps):
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        t1 = time.perf_counter()
        cache = out.past_key_values
        for token in steps:
            cache = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).past_key_values
        return t1 - t0, time.perf_counter() - t1

    return run


def transformers_model(path: str, threads: int, n_ctx: int, quantized: bool):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    extra = {"device_map": "cpu"} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()
    return torch_runner(model), model.config.vocab_size


def quanto_model(path: str, threads: int, n_ctx: int, quantized: bool):
    import torch

    if not quantized:
        return transformers_model(path, threads, n_ctx, False)
    from optimum.quanto import QuantizedModelForCausalLM

    torch.set_num_threads(threads)
    model = QuantizedModelForCausalLM.from_pretrained(path)._wrapped.eval()
    return torch_runner(model), model.config.vocab_size


def mlx_model(path: str, threads: int, n_ctx: int, quantized: bool):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    mx.set_default_device(mx.cpu)
    model, _ = load(path)

    def run(prompt, steps):
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        mx.eval(model(mx.array([prompt]), cache=cache))
        t1 = time.perf_counter()
        for token in steps:
            mx.eval(model(mx.array([[token]]), cache=cache))
        return t1 - t0, time.perf_counter() - t1

    return run, model.args.vocab_size


LOADERS = {"transformers": transformers_model, "quanto": quanto_model, "mlx": mlx_model}
# what each runtime's figures depend on (those installed in its venv are reported beside them)
RUNTIME_DISTRIBUTIONS = {"llamacpp": ["llama_cpp_python"],
                         "transformers": ["torch", "transformers", "bitsandbytes", "torchao"],
                         "quanto": ["torch", "transformers", "optimum-quanto"], "mlx": ["mlx", "mlx-lm"]}


def versions(distributions: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in distributions:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runtime", choices=["llamacpp", *LOADERS])
    p.add_argument("--base", required=True)
    p.add_argument("--quantized", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n_ctx = args.prompt + args.decode + 8
    if args.runtime == "llamacpp":
        runs = {"baseline": llamacpp(args.base, args.threads, n_ctx), "quantized": llamacpp(args.quantized,
                                                                                              args.threads, n_ctx)}
    else:
        load = LOADERS[args.runtime]
        runs = {"baseline": load(args.base, args.threads, n_ctx, False),
                "quantized": load(args.quantized, args.threads, n_ctx, True)}
    vocab = min(v for _, v in runs.values())
    prompt, steps = tokens(vocab, args.prompt, args.seed), tokens(vocab, args.decode, args.seed + 1)
    times = {name: [] for name in runs}
    for name, (run, _) in runs.items():  # warm-up: first-call allocations and kernel selection
        run(prompt[:16], steps[:2])
    for _ in range(args.repeats):  # alternated, so a load change on the machine hits both alike
        for name, (run, _) in runs.items():
            times[name].append(run(prompt, steps))
    result = {name: {"prefill_tps": args.prompt / statistics.median(t[0] for t in ts),
                     "decode_tps": args.decode / statistics.median(t[1] for t in ts),
                     "prefill_s": [t[0] for t in ts], "decode_s": [t[1] for t in ts]}
              for name, ts in times.items()}
    print(json.dumps({**result, "versions": versions(RUNTIME_DISTRIBUTIONS[args.runtime])}))


if __name__ == "__main__":
    main()

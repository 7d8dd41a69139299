#!/usr/bin/env bash
# The arena: our quantizers and the checkpoints other tools make of the same model, judged on the same windows and
# lm-eval documents against the same baseline, then one report (intervals, bits per weight, wins/ties/losses,
# KLD against stored bits with the Pareto front).
#
# Usage: scripts/arena.sh [RESULTS_DIR]      (default results/arena; checkpoints go to $ARENA_CHECKPOINTS,
#                                             default $QUANT_HARNESS_CACHE/arena or ~/.cache/quant-harness/arena)
#        ARENA_MODEL_DIR=/models/base scripts/arena.sh results/arena-base     (model=hf on a local directory;
#                                             its GGUF is written by scripts/produce/gguf_write.py: Llama only)
#        ARENA_EVAL="eval=ppl eval.max_windows=2" scripts/arena.sh ...          (other eval settings)
# Needs the reference venvs (each tool in its own): scripts/setup_gptq_reference.sh, setup_awq_reference.sh,
# setup_llmcompressor_reference.sh, setup_autoround_reference.sh, setup_llamacpp_reference.sh [--tools], and
# scripts/setup_weightonly_reference.sh bnb|mlx|hqq|quanto|torchao (under $VENVS, default /work/venvs).
# Last, benchmarks/bench_runtimes.py times every checkpoint in its own CPU runtime beside the unquantized baseline in
# that runtime (RESULTS/speed.md and speed.csv; ARENA_SPEED=0 skips it: on a shared machine its figures are "under
# load"), and the report joins the speed to KLD (kld_vs_decode plot).
# A checkpoint whose tool's venv is missing is skipped with a line saying so; a finished checkpoint or run is reused
# (the harness verifies and resumes), so re-running after an interruption continues where it stopped.
#
# Every tool that calibrates gets our calibration draw (wiki, ARENA_CALIB_SAMPLES x 512 tokens, seed 0; default 128,
# the AWQ recipe; llama.cpp's imatrix the same windows as text). On a 2-core CPU, AWQ at 128 x 512 takes about an hour
# per run (ours and AutoAWQ alike): ARENA_CALIB_SAMPLES=16 gives every method and tool the same 16 windows instead. Settings match ours where the algorithm is the same (w4, asymmetric, damp 0.01, no act-order);
# AutoRound keeps its own recipe (symmetric) with ARENA_AUTOROUND_ITERS steps per block (default 200, the library's).
# Group size: AutoAWQ and llm-compressor refuse a group size that does not divide every layer, and SmolLM2's hidden
# size 576 is not a multiple of 128, so the tools run at ARENA_GROUP (default 64) and ours at both 128 (w4 and w3,
# the last group of a 576-wide layer short, as the GPTQ reference does) and ARENA_GROUP (w4); GPTQModel, which takes
# a short last group, also at 128.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
RESULTS="${1:-results/arena}"
CACHE="${QUANT_HARNESS_CACHE:-$HOME/.cache/quant-harness}"
CK="${ARENA_CHECKPOINTS:-$CACHE/arena}"
ITERS="${ARENA_AUTOROUND_ITERS:-200}"
G="${ARENA_GROUP:-64}"
N="${ARENA_CALIB_SAMPLES:-128}"
EVAL=(${ARENA_EVAL:-eval=quick})   # the default job's windows and documents
VENVS="${QUANT_HARNESS_VENVS:-/work/venvs}"
LLAMACPP="${ARENA_LLAMACPP_VENV:-/work/venv-llamacpp}"
[[ -x "$LLAMACPP/bin/python" ]] || LLAMACPP="$VENVS/llamacpp"
IQ_TYPES="${ARENA_IQ_TYPES:-IQ4_XS IQ4_NL IQ3_M IQ3_XXS IQ2_M IQ2_XXS}"
mkdir -p "$CK"

if [[ -n "${ARENA_MODEL_DIR:-}" ]]; then  # a local model: its own GGUF, written once
  BASE="$(cd "$ARENA_MODEL_DIR" && pwd)"
  MODEL=(model=hf "model.path=$BASE")
  GGUF="$CK/base-F32.gguf"
  [[ -e "$GGUF" ]] || "$PY" scripts/produce/gguf_write.py from-hf "$BASE" "$GGUF" --type F32 || GGUF=""
else  # the packaged model: the llama.cpp file it comes from
  BASE="$("$PY" -c 'from harness.models import convert_packaged, default_cache_dir; print(convert_packaged(default_cache_dir()))')"
  MODEL=()
  GGUF="$("$PY" -c 'from harness.models import packaged_gguf_path; print(packaged_gguf_path())')"
fi
echo "base model: $BASE (GGUF: ${GGUF:-none}); checkpoints: $CK; results: $RESULTS"

produce() {  # produce NAME VENV COMMAND...: make $CK/NAME with COMMAND unless it is there or the venv is missing
  local name="$1" venv="$2"; shift 2
  if [[ -e "$CK/$name" ]]; then echo "have $name"; return; fi
  if [[ ! -x "$venv/bin/python" ]]; then echo "skip $name: $venv is missing (see the setup scripts)"; return; fi
  echo "producing $name"; "$@" || echo "FAILED to produce $name (see above)"
}

# GGUF: the gguf package's own quantizer, and llama.cpp's (a K-quant mix, without and with an importance matrix)
if [[ -n "$GGUF" ]]; then
produce gguf-Q4_0.gguf "$REPO/.venv" "$PY" scripts/produce/gguf_write.py requantize "$GGUF" "$CK/gguf-Q4_0.gguf" --type Q4_0
produce gguf-MXFP4.gguf "$REPO/.venv" "$PY" scripts/produce/gguf_write.py requantize "$GGUF" "$CK/gguf-MXFP4.gguf" \
  --type MXFP4
produce gguf-Q4_K_M.gguf "$LLAMACPP" "$LLAMACPP/bin/python" scripts/produce/llamacpp.py \
  "$GGUF" "$CK/gguf-Q4_K_M.gguf" --type Q4_K_M
IMATRIX_BIN="$LLAMACPP/llama-build/bin"
if [[ -x "$IMATRIX_BIN/llama-imatrix" && ! -e "$CK/gguf-Q4_K_M-imatrix.gguf" ]]; then
  "$PY" scripts/produce/calib_text.py "$CK/calib-wiki-${N}x512.txt" --model "$BASE" --n-samples "$N"
  [[ -e "$CK/imatrix.gguf" ]] || "$IMATRIX_BIN/llama-imatrix" -m "$GGUF" -f "$CK/calib-wiki-${N}x512.txt" \
      -o "$CK/imatrix.gguf" -c 512 -t 2
  produce gguf-Q4_K_M-imatrix.gguf "$LLAMACPP" "$LLAMACPP/bin/python" scripts/produce/llamacpp.py \
    "$GGUF" "$CK/gguf-Q4_K_M-imatrix.gguf" --type Q4_K_M --imatrix "$CK/imatrix.gguf" \
    --quantize-bin "$IMATRIX_BIN/llama-quantize"
fi
if [[ -x "$IMATRIX_BIN/llama-quantize" && -e "$CK/imatrix.gguf" ]]; then  # i-quants, with the same importance matrix
  for type in $IQ_TYPES; do
    produce "gguf-$type-imatrix.gguf" "$LLAMACPP" "$LLAMACPP/bin/python" scripts/produce/llamacpp.py "$GGUF" \
      "$CK/gguf-$type-imatrix.gguf" --type "$type" --imatrix "$CK/imatrix.gguf" --quantize-bin "$IMATRIX_BIN/llama-quantize"
  done
fi
fi
# the data-free weight-only formats people download: bitsandbytes, MLX, HQQ, optimum-quanto, torchao (each library in
# its own venv; none calibrates)
W=scripts/produce/weightonly.py
produce bnb-nf4 "$VENVS/bnb" "$VENVS/bnb/bin/python" $W bnb "$BASE" "$CK/bnb-nf4" --quant-type nf4 --no-double-quant
produce bnb-nf4-dq "$VENVS/bnb" "$VENVS/bnb/bin/python" $W bnb "$BASE" "$CK/bnb-nf4-dq" --quant-type nf4 --double-quant
produce "mlx-w4g$G" "$VENVS/mlx" "$VENVS/mlx/bin/python" $W mlx "$BASE" "$CK/mlx-w4g$G" --bits 4 --group-size "$G"
produce "mlx-w8g$G" "$VENVS/mlx" "$VENVS/mlx/bin/python" $W mlx "$BASE" "$CK/mlx-w8g$G" --bits 8 --group-size "$G"
produce "hqq-w4g$G" "$VENVS/hqq" "$VENVS/hqq/bin/python" $W hqq "$BASE" "$CK/hqq-w4g$G" --bits 4 --group-size "$G"
produce quanto-qint4 "$VENVS/quanto" "$VENVS/quanto/bin/python" $W quanto "$BASE" "$CK/quanto-qint4" --weights qint4
produce "torchao-int4-g$G" "$VENVS/torchao" "$VENVS/torchao/bin/python" $W torchao "$BASE" "$CK/torchao-int4-g$G" \
  --group-size "$G" --sym
# GPTQ and AWQ by their reference implementations, llm-compressor's modifiers, AutoRound
produce gptqmodel-w4g128 /work/venv-gptq /work/venv-gptq/bin/python scripts/produce/gptqmodel.py --n-samples "$N" \
  --model "$BASE" --out "$CK/gptqmodel-w4g128" --bits 4 --group-size 128 --no-sym --no-desc-act
produce "gptqmodel-w4g$G" /work/venv-gptq /work/venv-gptq/bin/python scripts/produce/gptqmodel.py --n-samples "$N" \
  --model "$BASE" --out "$CK/gptqmodel-w4g$G" --bits 4 --group-size "$G" --no-sym --no-desc-act
produce "autoawq-w4g$G" /work/venv-awq /work/venv-awq/bin/python scripts/produce/autoawq.py --n-samples "$N" \
  --model "$BASE" --out "$CK/autoawq-w4g$G" --bits 4 --group-size "$G" --zero-point
produce "llmc-gptq-w4g$G" /work/venv-llmc /work/venv-llmc/bin/python scripts/produce/llmcompressor.py --n-samples "$N" \
  "$BASE" "$CK/llmc-gptq-w4g$G" --modifier gptq --bits 4 --group-size "$G" --no-sym --actorder none
produce "llmc-awq-w4g$G" /work/venv-llmc /work/venv-llmc/bin/python scripts/produce/llmcompressor.py --n-samples "$N" \
  "$BASE" "$CK/llmc-awq-w4g$G" --modifier awq --bits 4 --group-size "$G" --no-sym
produce "autoround-w4g$G" /work/venv-autoround /work/venv-autoround/bin/python scripts/produce/autoround.py --n-samples "$N" \
  "$BASE" "$CK/autoround-w4g$G" --bits 4 --group-size "$G" --iters "$ITERS"

# ours, then every checkpoint that exists, each named by its file or directory
"$PY" -m harness -m "${MODEL[@]}" method=fp,rtn,gptq,awq,awq_gptq bits=4,3 group_size=128 calib.n_samples="$N" \
  "${EVAL[@]}" results_dir="$RESULTS"
"$PY" -m harness -m "${MODEL[@]}" method=rtn,gptq,awq,awq_gptq bits=4 group_size="$G" calib.n_samples="$N" "${EVAL[@]}" \
  results_dir="$RESULTS"
CHECKPOINTS=()
for path in "$CK"/gguf-*.gguf "$CK"/gptqmodel-* "$CK"/autoawq-* "$CK"/llmc-* "$CK"/autoround-* "$CK"/bnb-* \
    "$CK"/mlx-* "$CK"/hqq-* "$CK"/quanto-* "$CK"/torchao-*; do
  [[ -e "$path" && "$path" != *.json && "$path" != */base-F32*.gguf ]] || continue
  CHECKPOINTS+=("$path")
  label="$(basename "$path" .gguf)"
  "$PY" -m harness "${MODEL[@]}" method=checkpoint method.path="$path" method.label="$label" "${EVAL[@]}" \
    results_dir="$RESULTS"
done
SPEED=()
if [[ "${ARENA_SPEED:-1}" != 0 && ${#CHECKPOINTS[@]} -gt 0 ]]; then
  # llama.cpp's baseline: the base model itself, block weights in F32, with the tokenizer llama.cpp needs (the packaged
  # file's own; its token_embd stays Q4_1, which is exactly the base model's table)
  BASE_GGUF="$CK/base-F32.gguf"
  if [[ -z "${ARENA_MODEL_DIR:-}" && ! -e "$CK/base-F32-llamacpp.gguf" ]]; then
    "$PY" scripts/produce/gguf_write.py requantize "$GGUF" "$CK/base-F32-llamacpp.gguf" --type F32
  fi
  [[ -z "${ARENA_MODEL_DIR:-}" ]] && BASE_GGUF="$CK/base-F32-llamacpp.gguf"
  [[ -e "$BASE_GGUF" ]] || "$PY" scripts/produce/gguf_write.py from-hf "$BASE" "$BASE_GGUF" --type F32
  # MLX's Linux CPU build decodes its quantized model at ~0.2 tok/s on 2 cores (a scalar quantized matmul): timed apart,
  # on a short prompt and one repeat, so that it takes minutes and not hours; the report shows each row's lengths
  FAST=() SLOW=()
  for path in "${CHECKPOINTS[@]}"; do [[ "$(basename "$path")" == mlx-* ]] && SLOW+=("$path") || FAST+=("$path"); done
  if [[ ${#FAST[@]} -gt 0 ]]; then
    "$PY" benchmarks/bench_runtimes.py --base "$BASE" --base-gguf "$BASE_GGUF" --csv "$RESULTS/speed.csv" \
      ${ARENA_SPEED_ARGS:---threads 2 --prompt 128 --decode 32 --repeats 7} "${FAST[@]}" | tee "$RESULTS/speed.md"
    SPEED+=("$RESULTS/speed.csv")
  fi
  if [[ ${#SLOW[@]} -gt 0 ]]; then
    "$PY" benchmarks/bench_runtimes.py --base "$BASE" --csv "$RESULTS/speed_mlx.csv" \
      ${ARENA_SPEED_SLOW_ARGS:---threads 2 --prompt 16 --decode 4 --repeats 1} "${SLOW[@]}" | tee "$RESULTS/speed_mlx.md"
    SPEED+=("$RESULTS/speed_mlx.csv")
  fi
  SPEED=(--speed "${SPEED[@]}")
fi
"$PY" -m analysis.report "$RESULTS" --out "$RESULTS/report" "${SPEED[@]}"
echo "report: $RESULTS/report/report.md"

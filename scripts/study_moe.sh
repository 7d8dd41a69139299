#!/usr/bin/env bash
# The mixture-of-experts study of docs/moe.md and README ("Mixtures of experts"): RTN, GPTQ and AWQ at w4 and w3 g128
# on the upcycled SmolLM2 MoE (model=smollm2_moe: 8 experts, top-2, Mixtral layout), with two calibration draws,
# routed against moe_routing=all calibration, and how many experts fall back to round-to-nearest at 8, 32 and 128
# calibration samples (from the routing of those draws: benchmarks/upcycle_quality.py). Every run is evaluated on the
# same tokens (wiki, code, prose: 2 windows of 2048 each, with KLD against the unquantized MoE). Results go to
# $RESULTS (default results/moe_study); a killed study resumes where it stopped (finished runs are skipped).
# About 2 h of one core on a 2-core AMD EPYC.
#
#   bash scripts/study_moe.sh            # then: python scripts/study_moe_tables.py results/moe_study
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results/moe_study}
EVAL="model=smollm2_moe eval=ppl eval.max_windows=2 results_dir=$RESULTS"
run() { "$PY" -m harness "$@" $EVAL; }

# 0. the unquantized MoE and RTN (no calibration)
run method=fp
run -m method=rtn bits=3,4
# 1. GPTQ and AWQ at w4, two draws of 8 x 512 wiki calibration tokens, routed (the default), and at w3 one draw
run -m method=gptq,awq bits=4 calib.n_samples=8 calib.seed=0,1
run -m method=gptq,awq bits=3 calib.n_samples=8 calib.seed=0
# 2. every token through every expert for the statistics (llm-compressor's default), w4, the same draws
run -m method=gptq,awq bits=4 calib.n_samples=8 calib.seed=0 calib.moe_routing=all
run -m method=gptq,awq bits=4 calib.n_samples=8 calib.seed=1 calib.moe_routing=all
# 3. fallbacks against the calibration budget (8, 32, 128 samples): the routing of those draws alone, no quantization
"$PY" benchmarks/upcycle_quality.py --windows 2 --calib-samples 8,32,128 | tee "$RESULTS/upcycle_quality.txt"

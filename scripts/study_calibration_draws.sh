#!/usr/bin/env bash
# The calibration-draw study of docs/statistics.md and README ("Conclusions that survive another calibration draw"):
# GPTQ and AWQ at w3 and w4 g128, replicate calibration draws (calib.seed), evaluated on the same eval tokens
# (wiki, code, prose: 2 windows of 2048 each, with KLD). Results go to $RESULTS (default results/calib_study);
# a killed study resumes where it stopped (finished runs are skipped). CPU budget on 2 cores: about 100 s per run.
#
#   bash scripts/study_calibration_draws.sh            # everything, in the order below
#   python -m analysis.compare results/calib_study --replicates        # replicate comparisons
#   python -m analysis.draws results/calib_study                        # variance components, data needed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results/calib_study}
EVAL="eval=ppl eval.max_windows=2 results_dir=$RESULTS"
run() { "$PY" -m harness "$@" $EVAL; }

# 0. the unquantized model on the same tokens (equivalence against the baseline)
run method=fp
# 1. five draws of 32 x 512 calibration tokens from wiki, w3 then w4
for bits in 3 4; do
    run -m method=gptq,awq bits=$bits calib.n_samples=32 calib.seed=0,1,2,3,4
done
# 2. five draws of 8 x 512: how the draw's share of the variance grows as calibration shrinks
for bits in 3 4; do
    run -m method=gptq,awq bits=$bits calib.n_samples=8 calib.seed=0,1,2,3,4
done
# 3. calibration-set robustness: calibrated on code and on prose (wiki is step 1), three draws each
for bits in 3 4; do
    run -m method=gptq,awq bits=$bits calib.n_samples=32 calib.source=code,prose calib.seed=0,1,2
done

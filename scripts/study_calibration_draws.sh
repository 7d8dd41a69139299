#!/usr/bin/env bash
# The calibration-draw study of docs/statistics.md and README ("Conclusions that survive another calibration draw"):
# GPTQ and AWQ at g128, replicate calibration draws (calib.seed), every run evaluated on the same eval tokens (wiki,
# code, prose: 2 windows of 2048 each, with KLD against the unquantized model). Results go to $RESULTS (default
# results/calib_study); a killed study resumes where it stopped (finished runs are skipped).
#
# CPU budget (2-core AMD EPYC): ~3 min per GPTQ or AWQ run at 32 x 512, ~1.7 min at 8 x 512 (about 90 min in all).
# What the budget left out is listed in docs/statistics.md (w4 at 8 x 512, w4 robustness, more than 3 draws off-wiki).
#
#   bash scripts/study_calibration_draws.sh
#   python -m analysis.compare results/calib_study/<gptq w3 runs> results/calib_study/<awq w3 runs>
#   python -m analysis.draws results/calib_study        # variance components and the data a verdict needs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results/calib_study}
EVAL="eval=ppl eval.max_windows=2 results_dir=$RESULTS"
run() { "$PY" -m harness "$@" $EVAL; }

# 0. the unquantized model on the same tokens (equivalence against the baseline)
run method=fp
# 1. w3: five draws of 32 x 512 calibration tokens from wiki, then five of 8 x 512
run -m method=gptq,awq bits=3 calib.n_samples=32 calib.seed=0,1,2,3,4
run -m method=gptq,awq bits=3 calib.n_samples=8 calib.seed=0,1,2,3,4
# 2. calibration-set robustness at w3, 8 x 512: calibrated on code and on prose (wiki is step 1), three draws each
run -m method=gptq,awq bits=3 calib.n_samples=8 calib.source=code,prose calib.seed=0,1,2
# 3. w4, 32 x 512, three draws (equivalence to the baseline; the draw's share at w4)
run -m method=gptq,awq bits=4 calib.n_samples=32 calib.seed=0,1,2

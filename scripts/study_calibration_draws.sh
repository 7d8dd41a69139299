#!/usr/bin/env bash
# The calibration-draw study of docs/statistics.md and README ("Conclusions that survive another calibration draw"):
# GPTQ and AWQ at g128 with replicate calibration draws (calib.seed), every run evaluated on the same eval tokens
# (wiki, code, prose: 2 windows of 2048 each, with KLD against the unquantized model). Results go to $RESULTS
# (default results/calib_study); a killed study resumes where it stopped (finished runs are skipped).
#
# CPU budget (2-core AMD EPYC, with other work beside it): GPTQ ~1.5 min per run at 8 x 512 and ~4 min at
# 32 x 512; AWQ ~6 min at 8 x 512 and ~25 min at 32 x 512 (its grid search runs every scaling group's module 20
# times over all calibration tokens). AWQ at 32 x 512 was therefore left out; docs/statistics.md lists what the
# budget did not cover.
#
#   bash scripts/study_calibration_draws.sh
#   python -m analysis.compare results/calib_study/<runs of A> results/calib_study/<runs of B> [--margin ppl=1%]
#   python -m analysis.draws results/calib_study        # variance components and the data a verdict needs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results/calib_study}
EVAL="eval=ppl eval.max_windows=2 results_dir=$RESULTS"
run() { "$PY" -m harness "$@" $EVAL; }

# 0. the unquantized model and RTN (no calibration) on the same tokens
run method=fp
run -m method=rtn bits=3,4
# 1. GPTQ w3: five draws of 32 x 512 calibration tokens from wiki (the draw's share with 4x more calibration)
run -m method=gptq bits=3 calib.n_samples=32 calib.seed=0,1,2,3,4
# 2. w3, five draws of 8 x 512 from wiki: GPTQ against AWQ
run -m method=gptq,awq bits=3 calib.n_samples=8 calib.seed=0,1,2,3,4
# 3. w4, three draws of 8 x 512: equivalence to the baseline, the draw's share at w4
run -m method=awq,gptq bits=4 calib.n_samples=8 calib.seed=0,1,2
# 4. calibration-set robustness at w3, 8 x 512: calibrated on code and on prose (wiki is step 2)
run -m method=gptq bits=3 calib.n_samples=8 calib.source=code,prose calib.seed=0,1,2
run -m method=awq bits=3 calib.n_samples=8 calib.source=code,prose calib.seed=0,1

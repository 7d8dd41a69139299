#!/usr/bin/env bash
# Every table of the calibration-draw study (scripts/study_calibration_draws.sh), from its finished runs alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${RESULTS:-results/calib_study}
W3="--where bits=3 --where calib_source=wiki --where calib_samples=8"
echo "## 1. GPTQ vs AWQ, w3 g128, 8 x 512 wiki calibration, replicate draws"
$PY -m analysis.compare "$R" $W3 --where method=gptq,awq --margin ppl=1%
echo; echo "## 2. w4 g128 (AWQ, GPTQ: 8 x 512, replicate draws) against RTN and the unquantized model, margin 1% ppl"
$PY -m analysis.compare "$R" --where bits=4,none --where calib_samples=8,none --margin ppl=1%
echo; echo "## 3. w3 against RTN w3"
$PY -m analysis.compare "$R" --where bits=3 --where calib_samples=8,none --where calib_source=wiki,none \
    --where method=gptq,awq,rtn
echo; echo "## 4. How much of each result is the calibration draw"
$PY -m analysis.draws "$R"
echo; echo "## 5. What a GPTQ-vs-AWQ verdict at w3 needs (per eval set; 1%, 0.05 nats)"
$PY -m analysis.draws "$R" $W3 --split method=gptq,awq --target ppl=1% --target kld=0.05
echo; echo "## 6. Calibration-set robustness, w3 g128, 8 x 512"
$PY -m analysis.robustness "$R" --where bits=3 --where calib_samples=8

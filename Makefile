# Shortcuts for the README's commands. PY is the project's virtual environment.
PY ?= .venv/bin/python
REPORT_DIR ?= reports/paper_table

.PHONY: setup run test report robustness regress-baseline
setup:            ## create .venv with everything the harness needs
	bash scripts/setup.sh --test
run: setup        ## the default job on the packaged model
	$(PY) -m harness
test: setup       ## the test suite (what CI runs)
	$(PY) -m pytest -q
report: setup     ## the comparison sweep (resumable) and its report
	OMP_NUM_THREADS=1 $(PY) -m harness +experiment=paper_table  # one thread per parallel job
	$(PY) -m analysis.report results --main-calib wiki --out $(REPORT_DIR)
robustness: setup ## calibrate on each domain, evaluate on each
	$(PY) -m harness +experiment=calib_robustness
	$(PY) -m analysis.report results --out reports/calib_robustness
regress-baseline: ## regenerate tests/baselines/tiny after an intended change of numbers
	$(PY) tests/regression_suite.py

# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Each creates the virtual environment (.venv) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.workbench-installed
# the core (training engine) plus every extra: notebooks, dashboard, Cityscapes recipe, Slurm, tests (pyproject.toml)
ALL_EXTRAS := test,notebooks,dashboard,cityscapes,slurm

.PHONY: demo test test-fast lint venv bench clean-runs strip-notebooks

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(ALL_EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

# the quickstart notebook through papermill: reports/quickstart/ gets the executed notebook, its HTML export,
# index.html, and the quickstart's summary.json, report.md and figures
demo: $(STAMP)
	$(PY) -m workbench report 00_quickstart --out reports
	@echo; cat reports/quickstart/report.md; echo "Open reports/quickstart/00_quickstart.html for the figures."

test: $(STAMP)
	$(PY) -m pytest -q

# the inner loop: everything but the tests marked slow (real processes, DDP, kills, papermill kernels, browsers, Slurm)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# ruff (configured in pyproject.toml, version pinned in constraints.txt); CI runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	for m in supervised fixmatch meanteacher unimatch maskmatch corrmatch rankmatch s4mim scalematch; do $(PY) -m workbench bench --method $$m || exit 1; done

clean-runs:
	rm -rf runs

# the notebooks as the repository keeps them: no outputs, execution counts or widget state (after saving a notebook
# run in JupyterLab; tests/test_notebooks.py fails on a notebook stored with outputs)
strip-notebooks: $(STAMP)
	$(PY) -c "from workbench.viz.notebook import strip_notebooks; print('stripped:', *strip_notebooks('notebooks') or ['nothing'])"

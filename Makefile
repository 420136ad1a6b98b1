# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Each creates the virtual environment (.venv) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.workbench-installed

.PHONY: demo test venv bench clean-runs strip-notebooks

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# the quickstart notebook through papermill: reports/quickstart/ gets the executed notebook, its HTML export,
# index.html, and the quickstart's summary.json, report.md and figures
demo: $(STAMP)
	$(PY) -m workbench report 00_quickstart --out reports

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for m in supervised fixmatch meanteacher unimatch maskmatch corrmatch rankmatch s4mim scalematch; do $(PY) -m workbench bench --method $$m || exit 1; done

clean-runs:
	rm -rf runs

# the notebooks as the repository keeps them: no outputs, execution counts or widget state (after saving a notebook
# run in JupyterLab; tests/test_notebooks.py fails on a notebook stored with outputs)
strip-notebooks: $(STAMP)
	$(PY) -c "from workbench.viz.notebook import strip_notebooks; print('stripped:', *strip_notebooks('notebooks') or ['nothing'])"

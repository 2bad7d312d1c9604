# Two entry points (see README): `make book` and `make test`. Everything else is a step of those.
# Another environment (conda, or any activated one) instead of .venv: pass its bin folder on the command line,
# `make test BIN="$CONDA_PREFIX/bin"`; `make env BIN=...` then installs xmr into it instead of creating .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
XMR_DATA ?= $(abspath ../shared/data)
# the comparison reads the paper notebooks' result files: it runs last
NOTEBOOKS := $(filter-out notebooks/comparison.ipynb,$(wildcard notebooks/*.ipynb)) notebooks/comparison.ipynb
export XMR_DATA
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
# a smoke kernel once hung in a tokenizer call; the Rust tokenizers' thread pool is a known deadlock source
export TOKENIZERS_PARALLELISM := false

.PHONY: env test lint lab new-paper repository smoke-notebooks notebooks book html bench clean

$(BIN)/.installed: pyproject.toml
	@if [ ! -x "$(BIN)/python" ]; then \
		if [ "$(BIN)" != "$(VENV)/bin" ]; then echo "no python in BIN=$(BIN)"; exit 1; fi; \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,book,lab]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3
	touch $@

env: $(BIN)/.installed  ## create the virtual environment (or use BIN=...) and install xmr with its extras

lint: env  ## ruff on the package, tests, tools and the notebooks' code cells (the rules are in pyproject.toml)
	$(BIN)/ruff check .

lab: env  ## JupyterLab on notebooks/, with this environment's kernel (live widgets: notebooks/explorer.ipynb)
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

repository:  ## point the book's buttons and the notebooks' Colab cells at the repository: make repository REPO=owner/xmr
	@if [ -z "$(REPO)" ]; then echo "usage: make repository REPO=<owner>/<name> (the repository on GitHub)"; exit 2; fi
	python3 tools/set_repository.py $(REPO)

new-paper: env  ## start a reproduction from the template: make new-paper ID=smith2025
	@if [ -z "$(ID)" ]; then echo "usage: make new-paper ID=<paper id, e.g. smith2025>"; exit 2; fi
	$(BIN)/python -m xmr.new_paper $(ID)

test: env  ## unit tests, the notebooks in smoke mode (nbval), a strict build of the book and a browser check
	$(BIN)/pytest -q tests --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600

smoke-notebooks: env  ## re-execute the smoke references that nbval checks (after changing a notebook)
	$(BIN)/python tools/smoke_notebooks.py

notebooks: env  ## execute every notebook in place with its default (book) parameters; the only run that publishes into results/ (tools/run_notebook.py: retries a hung explorer)
	XMR_BOOK_RUN=1 $(BIN)/python tools/run_notebook.py $(NOTEBOOKS)

html: env  ## render the site from the already executed notebooks (assets served locally: works offline)
	$(BIN)/python tools/vendor_web_assets.py
	$(BIN)/jupyter-book build . --builder html -W --keep-going

book: notebooks html  ## execute the notebooks, then render the site into _build/html

bench: env  ## every benchmark against its same-run baseline; writes benchmarks/results/cpu.json (idle machine!)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf _build

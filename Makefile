# Two commands on a fresh machine: `make demo` and `make test`.
# The CPU torch wheel is installed first, pinned, so that nothing can pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?=

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile scripts/install-tensorrt-rtx.sh scripts/install-simde.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install $(PIP_FLAGS) --quiet -e ".[test]"
	bash scripts/install-tensorrt-rtx.sh $(PY) $(PIP_FLAGS)
	bash scripts/install-simde.sh
	@echo "building the C++ CPU kernel once (about a minute; cached in torch's extension directory)"
	$(PY) -c "from fffcompile.runtime import cpu_kernel as k; k.load(); print('CPU kernel:', k.isa() or k.failure())"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m fffcompile bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

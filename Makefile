# One command each: `make bench` (the spec's sweep) and `make test`; both set up their own venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines and CI: a pinned build (a CPU wheel here). On a GPU machine bring your CUDA build,
# e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"; the package needs torch>=2.5.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install bench quick test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

bench: install
	$(PY) run_benchmark.py $(ARGS)

quick: install
	$(PY) run_benchmark.py --quick $(ARGS)

# Triton kernels run on the CPU through the interpreter when there is no GPU.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# make lab: set up (once) and open the course in JupyterLab.  make test: set up (once) and run every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NOTEBOOKS := $(wildcard notebooks/*.ipynb)
# The data root, made absolute: notebook kernels run inside notebooks/, not here.
export DDPM_DATA := $(abspath $(or $(DDPM_DATA),data))

.PHONY: lab test notebooks site figures evaluate guidance benchmark gpu-check gpu-prepare setup clean

# JupyterLab refuses to run as root (containers, cloud GPU machines) unless told it may.
USER_ID ?= $(shell id -u)
lab: $(VENV)/.installed
	$(BIN)/jupyter lab$(if $(filter 0,$(USER_ID)), --allow-root)

# Notebooks run in quick mode (DDPM_SMOKE=1): fewer images and training steps, the same code.
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DDPM_SMOKE=1 $(BIN)/python -m pytest --durations=20 tests $(if $(NOTEBOOKS),--nbval-lax notebooks)

# Re-run every notebook in full mode and save it with its outputs, as committed: about 30 minutes on 2 CPU cores.
notebooks: $(VENV)/.installed
	$(BIN)/python scripts/execute_notebooks.py

# The static course site in site/, from the committed notebooks (not re-executed), with the live sampler (npm fetches
# onnxruntime-web, pinned): serve it with python -m http.server -d site.
site: $(VENV)/.installed
	$(BIN)/python scripts/build_site.py

# The README's pictures, from the shipped checkpoint.
figures: $(VENV)/.installed
	$(BIN)/python scripts/make_figures.py

# The quality table of every sampler (docs/quality.md, figures/quality_vs_steps.png): about an hour on 2 CPU cores
# with fast bf16; then the comparisons across three seeds, all in one precision: about 45 minutes more in fp32.
evaluate: $(VENV)/.installed
	$(BIN)/python scripts/evaluate.py

# The guidance sweeps of notebook 8 (docs/guidance.md, figures/guidance_sweep.png): about 20 minutes on 2 CPU cores.
guidance: $(VENV)/.installed
	$(BIN)/python scripts/guidance_sweep.py

# Speed: training, sampling, each solver, sliders, GIF export, the nbval run and the browser's sampler (docs/benchmarks.md,
# every timing the course quotes): about 15 minutes on 2 CPU cores, with nothing else running.
benchmark: $(VENV)/.installed
	$(BIN)/python scripts/benchmark.py
	$(BIN)/python scripts/benchmark.py --browser

# The GPU check (docs/benchmarks.md, GPU section): about 6 minutes on one H100 or H200. It runs with the
# machine's own python3 and the library from this tree, not .venv. make gpu-prepare first, where there is
# a network: the GPU machine gets only the tree (carry data/ and wheels/ along) and installs nothing.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=.$(foreach wheel,$(wildcard wheels/*.whl),:$(wheel)) $(GPU_PYTHON) scripts/gpu_check.py

# MNIST into data/, and the one pure-Python package the library needs that the GPU machine lacks (filelock).
gpu-prepare: $(VENV)/.installed
	test -d data/MNIST || (mkdir -p data && cp -r $(DDPM_DATA)/MNIST data/)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --dest wheels filelock

setup: $(VENV)/.installed

# Re-install only when the dependencies change.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[course,test,onnx]"
	touch $@

clean:
	rm -rf $(VENV)

# ptkernels developer commands. On a fresh Linux machine with Python 3.11:
#   make demo    create .venv, install the locked dependencies, build ptkernels (editable), prompt-tune
#                a real pretrained model offline (ptkernels vs PEFT: table, JSON, plots)
#   make test    the same setup, then the test suite (CPU; GPU tests are skipped without CUDA)
# Dependencies come from requirements/lock.txt (exact versions of every direct and transitive
# package), so a clean clone next month resolves the same set. Other targets:
#   make lock          regenerate requirements/lock.txt (newest releases allowed by requirements/test.in)
#                      and requirements/lock-oldest.txt (the lowest supported transformers / PEFT)
#   make test-latest   the suite against the newest releases on the package index (.venv-latest)
#   make test-oldest   the suite against the oldest supported transformers / PEFT (.venv-oldest)
#   gpu-check (GPU tests + benchmarks into benchmarks/results/), wheel, bench, clean, distclean.
#
# Knobs: PYTHON (interpreter that creates the venv, default python3.11), VENV, PYTEST_ARGS,
# TORCH_SPEC (the torch that `make lock` / `make test-latest` install, default torch==2.14.1: the
# CUDA build from the package index), and the build switches of setup.py (PTKERNELS_BUILD_CUDA,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, ...), which pass through the environment.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON     ?= python3.11
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1
# Which dependency set a venv gets: lock (requirements/lock.txt), oldest (requirements/lock-oldest.txt)
# or latest (the newest release of every package named in requirements/test.in, no upper bounds).
DEPS       ?= lock
# The lowest releases ptkernels supports (tested by `make test-oldest`); pyproject.toml states them.
OLDEST     := transformers==5.15.0 peft==0.21.0
LOCKS      ?= lock oldest
PYTEST_ARGS ?=

PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip --disable-pip-version-check
STAMPS    := $(VENV)/.ptkernels
RESULTS   := benchmarks/results
# Anything that changes what setup.py builds; a newer file than the stamp triggers a rebuild.
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh csrc/kernels/*.cuh csrc/kernels/*.h)

.PHONY: help test test-latest test-oldest lock demo gpu-check bench wheel clean distclean install FORCE

help:
	@echo "make demo       set up .venv and prompt-tune a real model offline, ptkernels vs PEFT (a few minutes)"
	@echo "make test       set up .venv and run the test suite (pytest -n 2)"
	@echo "make test-latest / test-oldest   the suite on the newest releases / the oldest supported ones"
	@echo "make lock       regenerate requirements/lock.txt and lock-oldest.txt"
	@echo "make gpu-check  on a CUDA machine: GPU tests + benchmarks, report in $(RESULTS)/"
	@echo "make bench      ptkernels bench: kernel microbenchmarks + training steps into $(RESULTS)/"
	@echo "make wheel      build a CUDA/native wheel and a pure-Python wheel into dist/"
	@echo "make clean      remove build outputs (keeps .venv); make distclean also removes .venv"

# ---- environment -------------------------------------------------------------------------------
LOCK_FILE_lock   := requirements/lock.txt
LOCK_FILE_oldest := requirements/lock-oldest.txt
LOCK_FILE_latest := requirements/test.in

$(PY):
	$(PYTHON) -m venv $(VENV)

# Rewritten only when the requested dependency set changes, so switching DEPS reinstalls.
$(STAMPS)/requirements: FORCE | $(PY)
	@mkdir -p $(STAMPS)
	@echo "$(DEPS) $(TORCH_SPEC)" | cmp -s - $@ || echo "$(DEPS) $(TORCH_SPEC)" > $@

# lock / oldest: exactly the pinned set (no resolution), then `pip check` proves it is complete.
# latest: the newest release of every package named in test.in, upper bounds dropped on purpose.
$(STAMPS)/deps: $(STAMPS)/requirements $(LOCK_FILE_$(DEPS))
	@start=$$SECONDS; \
	if [ "$(DEPS)" = latest ]; then \
		$(PIP) install -q --upgrade pip "setuptools>=64" wheel; \
		names=$$(sed -E 's/#.*//; s/;.*//; s/[<>=!~ ].*//' requirements/test.in | grep -v '^$$'); \
		$(PIP) install -q --upgrade "$(TORCH_SPEC)" $$names; \
	else \
		$(PIP) install -q --no-deps -r $(LOCK_FILE_$(DEPS)); \
	fi; \
	$(PIP) check; \
	echo "dependencies ($(DEPS)) installed in $$((SECONDS - start)) s"; \
	$(PY) -c "import torch, transformers, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
	@touch $@

# Editable install: the extension is compiled once and copied to ptkernels/_C*.so, Python edits need
# no reinstall. --no-build-isolation builds against the torch in .venv (see setup.py).
$(STAMPS)/build: $(STAMPS)/deps $(BUILD_INPUTS)
	@start=$$SECONDS; \
	if ! $(PIP) install -v --no-build-isolation -e . > $(STAMPS)/build.log 2>&1; then \
		tail -n 80 $(STAMPS)/build.log; echo "build failed; full log: $(STAMPS)/build.log"; exit 1; \
	fi; \
	grep -m1 -o 'ptkernels: torch .*' $(STAMPS)/build.log || true; \
	echo "ptkernels built and installed in $$((SECONDS - start)) s (log: $(STAMPS)/build.log)"
	@touch $@

install: $(STAMPS)/build

# ---- everyday targets --------------------------------------------------------------------------
test: $(STAMPS)/build
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS) tests

# Forward and backward compatibility, tested on purpose (for developers and release checks; CI runs
# the locked set). Each uses its own venv, so the locked .venv stays as it is.
test-latest:
	$(MAKE) test VENV=.venv-latest DEPS=latest

test-oldest:
	$(MAKE) test VENV=.venv-oldest DEPS=oldest

# Regenerate the locks in throwaway venvs: the newest releases test.in allows, and the same with
# the oldest supported transformers / PEFT (LOCKS=oldest regenerates only that one). Review the diff, run `make test` and `make test-oldest`,
# commit both files.
lock:
	@set -e; for which in $(LOCKS); do \
		tmp=$$(mktemp -d); \
		$(PYTHON) -m venv $$tmp/venv; \
		$$tmp/venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip "setuptools>=64" wheel; \
		extra=""; [ $$which = oldest ] && extra="$(OLDEST)"; \
		$$tmp/venv/bin/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" -r requirements/test.in $$extra; \
		out=requirements/lock.txt; [ $$which = oldest ] && out=requirements/lock-oldest.txt; \
		{ echo "# Generated by \`make lock\` on $$(date -u +%F) ($$($$tmp/venv/bin/python -V), $$(uname -sm)) from"; \
		  echo "# requirements/test.in + $(TORCH_SPEC) $$extra. Do not edit by hand."; \
		  $$tmp/venv/bin/python -m pip freeze --all --exclude-editable | LC_ALL=C sort -f; } > $$out.tmp; \
		mv $$out.tmp $$out; rm -rf $$tmp; echo "wrote $$out"; \
	done

# The product's main job, offline: prompt-tune the pretrained MiniLM (a locked package) on a locked
# sentiment corpus through patch_model and through PEFT, table + JSON + plots (a few minutes on 2 cores).
demo: $(STAMPS)/build
	$(PY) -m ptkernels info
	@echo
	HF_HUB_OFFLINE=1 $(PY) -m ptkernels demo

# GPU tests and benchmarks in one command on a CUDA machine; the report lands in benchmarks/results/.
gpu-check: $(STAMPS)/build
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a visible CUDA GPU (torch.cuda.is_available() is False)')"
	@mkdir -p $(RESULTS)
	@gpu=$$($(PY) -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))"); \
	report=$(RESULTS)/gpu-check-$$gpu.md; status=0; \
	{ echo "# make gpu-check on $$gpu"; echo; echo "ptkernels commit: $$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; echo; \
	  echo '```'; $(PY) -m ptkernels info; echo '```'; echo; } > $$report; \
	{ echo "## pytest -m gpu"; echo; echo '```'; } >> $$report; \
	rc=0; $(PY) -m pytest -m gpu -rA -p no:cacheprovider $(PYTEST_ARGS) tests 2>&1 | tee -a $$report || rc=$$?; \
	if [ $$rc = 5 ]; then echo "(no tests are marked gpu yet)" | tee -a $$report; elif [ $$rc != 0 ]; then status=1; fi; \
	echo '```' >> $$report; \
	for bench in $$(grep -l -- '"--gpu"' benchmarks/bench_*.py | sort); do \
		{ echo; echo "## $$bench --gpu"; echo; echo '```'; } >> $$report; \
		$(PY) $$bench --gpu 2>&1 | tee -a $$report || status=1; \
		echo '```' >> $$report; \
	done; \
	echo "report: $$report"; exit $$status

# Kernel microbenchmarks and end-to-end training steps (CSV + Markdown + PNG into benchmarks/results/).
bench: $(STAMPS)/build
	@mkdir -p $(RESULTS)
	HF_HUB_OFFLINE=1 $(PY) -m ptkernels bench

# A native wheel tagged with the CUDA and torch it was built against (0.1.0+cu130torch2.14; with a CPU
# torch: +cputorch2.14, CPU ops only) and a pure-Python wheel (no ptkernels._C: eager + Triton).
# The native wheel only works with that torch version: extensions are tied to torch's ABI.
wheel: $(STAMPS)/deps
	@mkdir -p dist
	@read -r tag cuda < <($(PY) -c "import torch; c = torch.version.cuda; v = '.'.join(torch.__version__.split('+')[0].split('.')[:2]); print(('cu' + c.replace('.', '') if c else 'cpu') + 'torch' + v, 1 if c else 0)"); \
	rm -rf build; \
	echo "native wheel: PTKERNELS_LOCAL_VERSION=$$tag PTKERNELS_BUILD_CUDA=$$cuda"; \
	PTKERNELS_LOCAL_VERSION=$$tag PTKERNELS_BUILD_CUDA=$$cuda $(PIP) wheel -q --no-build-isolation --no-deps -w dist .; \
	rm -rf build; \
	echo "pure wheel: PTKERNELS_PURE=1"; \
	PTKERNELS_PURE=1 PTKERNELS_LOCAL_VERSION= $(PIP) wheel -q --no-build-isolation --no-deps -w dist .; \
	rm -rf build; \
	ls -l dist

clean:
	rm -rf build dist wheelhouse *.egg-info .pytest_cache .hypothesis
	rm -f ptkernels/_C*.so $(STAMPS)/build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

FORCE:

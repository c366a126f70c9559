# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
# Both create/refresh .venv only when pyproject.toml or constraints.txt changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tp2_pcp2_dcp4.yaml
PORT   ?= 29500
# torchrun sets OMP_NUM_THREADS=1 per rank anyway; setting it here keeps its warning out of the output.
TORCHRUN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --master-addr 127.0.0.1 --master-port $(PORT)

.PHONY: run test test-fast lint test-gpu bench bench-peers faults demo checkpoints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel; nothing later may replace it (constraints.txt).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The process count comes from the config (dp*pcp*tp); an invalid config stops here with one line.
run: $(STAMP)
	@nproc=$$($(PY) -m cptoolkit.config --world-size $(CONFIG)) && \
	$(TORCHRUN) --nproc-per-node $$nproc launch/infer.py --config $(CONFIG) --output out/result.json

test: lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check cptoolkit launch bench tests

# The edit loop's tier, under a minute on 2 cores: the layout, config, planner, cache, merge, sampling and
# detokenizer tests (pure or a few quick ranks). `make test` runs everything; CI runs `make test`.
FAST_TESTS := $(addprefix tests/test_,layout.py parallel_state.py config.py detokenizer.py lse_merge.py plan.py \
	block_pool.py dual_chunk_swap.py models_structure.py imports.py kv_cache.py kv_cache_ring.py progress.py train_data.py \
	sampling.py lse_merge_triton.py layout_ep.py)

test-fast: lint
	$(PY) -m pytest -q $(FAST_TESTS)

# The CUDA tests and the GPU benchmark, on a machine whose .venv already has CUDA torch (and, for the te
# backend, transformer-engine): nothing CUDA is installed here. Without a GPU every test skips with its reason.
test-gpu:
	$(PY) -m pytest -q -rs -m gpu tests/gpu
	$(PY) bench/gpu.py --quick

demo: $(STAMP)
	$(TORCHRUN) --nproc-per-node 4 launch/train.py --config configs/demo_train.yaml --output out/demo_losses.json
	$(TORCHRUN) --nproc-per-node 4 launch/infer.py --config configs/demo_infer.yaml --output out/demo_result.json

# The small models the reference configs serve, trained on the generated corpus at TP=1 x PCP=2 (about a
# minute each on 2 cores): checkpoints/tiny-gqa (2 KV heads) and checkpoints/tiny-mqa (1 KV head).
checkpoints: $(STAMP)
	$(TORCHRUN) --nproc-per-node 2 launch/train.py --config configs/train_tiny_gqa.yaml
	$(TORCHRUN) --nproc-per-node 2 launch/train.py --config configs/train_tiny_mqa.yaml

bench: $(STAMP)
	$(PY) bench/run_all.py --quick

# Other context-parallel attention libraries beside cptoolkit (bench/peers.py), in their own venv so that
# nothing of them reaches .venv: torch pinned first, then the [peers] extra under constraints.txt; DeepSpeed
# without prebuilt ops. The default is the full run (about 25 minutes on 2 cores); PEERS_ARGS=--quick is shorter.
PEERS_VENV  := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_ARGS  ?=

$(PEERS_STAMP): pyproject.toml constraints.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PEERS_VENV)/bin/pip install --quiet -c constraints.txt -e '.[peers]'
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python bench/peers.py $(PEERS_ARGS)

faults: $(STAMP)
	$(PY) bench/fault_tolerance.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
# Both create/refresh .venv only when pyproject.toml or constraints.txt changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
NPROC  ?= 4
CONFIG ?= configs/tp2_pcp2_dcp4.yaml
PORT   ?= 29500

.PHONY: run test bench demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel; nothing later may replace it (constraints.txt).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) --master-addr 127.0.0.1 --master-port $(PORT) \
		launch/infer.py --config $(CONFIG) --output out/result.json

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/torchrun --nproc-per-node 4 --master-addr 127.0.0.1 --master-port $(PORT) \
		launch/train.py --config configs/demo_train.yaml --output out/demo_losses.json
	$(VENV)/bin/torchrun --nproc-per-node 4 --master-addr 127.0.0.1 --master-port $(PORT) \
		launch/infer.py --config configs/demo_infer.yaml --output out/demo_result.json

bench: $(STAMP)
	$(PY) bench/run_all.py --quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

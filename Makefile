# Two commands: `make demo` and `make test`. Each creates .venv when missing
# (CPU torch first, so nothing pulls the multi-GB CUDA build), then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean fashion-data reproduce

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,hf]' torch==2.13.0
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST ships in Debian's dataset-fashion-mnist; install it when apt is usable.
fashion-data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1; } || \
	  echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or pass --data-dir)"

# One data draw (--same-data: seeds vary the training only, so the paired intervals measure the gates, not
# the draw), 20 epochs, 3 teachers; fixed-tuned tunes the student's learning rate too; the oracles show the
# headroom. The last lines printed: each learned gate against the best baseline, and its share of the headroom.
demo: $(STAMP) fashion-data
	$(BIN)/metagate compare --task digits --noise 0.4 --epochs 30 --same-data --seeds 0 1 2 3 4 5 6 7 --jobs 2 \
	  --out runs/demo --gates fixed fixed-tuned:alpha_grid=0.1/0.5,tau_grid=4,lr_scales=1/3 hard ca-mkd label-filter \
	  oracle-filter meta:meta_param=net

test: $(STAMP) fashion-data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

reproduce: $(STAMP) fashion-data
	scripts/reproduce.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

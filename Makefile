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

demo: $(STAMP) fashion-data
	$(BIN)/metagate compare --task digits --noise 0.4 --teachers 2 --epochs 10 --seeds 0 1 2 --jobs 2 --out runs/demo \
	  --gates ce fixed fixed-tuned:alpha_grid=0.1/0.5/0.9,tau_grid=4/,lr_scales=1/ hard label-filter best-teacher \
	  conf-teachers meta:meta_param=net reinforce

test: $(STAMP) fashion-data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

reproduce: $(STAMP) fashion-data
	scripts/reproduce.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

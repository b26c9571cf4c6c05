# Two commands: `make demo` and `make test`. Each creates .venv when missing
# (CPU torch first, so nothing pulls the multi-GB CUDA build), then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean fashion-data

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST ships in Debian's dataset-fashion-mnist; install it when apt is usable.
fashion-data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1; } || \
	  echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or pass --data-dir)"

demo: $(STAMP) fashion-data
	$(BIN)/metagate compare --task digits --noise 0.4 --gates ce fixed hard meta reinforce --meta-param net \
	  --seeds 0 1 2 --logdir runs/demo

test: $(STAMP) fashion-data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

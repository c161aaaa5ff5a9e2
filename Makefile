# Everything a fresh machine with Python 3.11 needs: `make test` creates .venv and installs the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

# The CPU demo (configs/shapes_demo.py): generated shapes, train, COCO evaluation, pictures of detections.
DEMO := runs/shapes_demo
demo: install
	$(BIN)/python -m sparse_detr_jax.data.shapes data/shapes --train 2000 --val 200 --seed 0
	$(BIN)/python train.py --config configs/shapes_demo.py --workdir $(DEMO)
	$(BIN)/python evaluate.py --config configs/shapes_demo.py --workdir $(DEMO)
	$(BIN)/python -m sparse_detr_jax.predict --config configs/shapes_demo.py --workdir $(DEMO) \
	    --threshold 0.3 --mechanism --out $(DEMO)/pictures $$(ls data/shapes/val/*.jpg | head -n 8)

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache *.egg-info

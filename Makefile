# Two commands do everything on a fresh machine (they create or reuse .venv first):
#   make demo   -- short SimMIM pre-training on the built-in synthetic dataset (CPU, a few minutes)
#   make test   -- the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CFG ?= configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml

.PHONY: demo test install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	$(PY) main_simmim.py --cfg $(DEMO_CFG) --output output/demo

test: install
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf output/demo

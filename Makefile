# Two commands do everything on a fresh machine (they create or reuse .venv first):
#   make demo   -- short SimMIM pre-training on the built-in synthetic dataset (CPU, a few minutes)
#   make test   -- the test suite
# Then: make finetune-demo / eval-demo / probe-demo (the demo's encoder, fine-tuned, evaluated,
# linearly probed on the synthetic classes), make lint (ruff, as CI runs it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CFG ?= configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml
QUICKSTART := configs/quickstart
DEMO_RUN := output/demo/simmim_pretrain/simmim_pretrain__swin_tiny__img64__synthetic
DEMO_CKPT ?= $(DEMO_RUN)/ckpt_epoch_15.pth
FINETUNE_RUN := output/demo/simmim_finetune/simmim_finetune__swin_tiny__img64__synthetic

.PHONY: demo finetune-demo eval-demo probe-demo test lint install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	$(PY) main_simmim.py --cfg $(DEMO_CFG) --output output/demo

finetune-demo: install
	$(PY) main_finetune.py --cfg $(QUICKSTART)/simmim_finetune__swin_tiny__img64__synthetic.yaml \
		--pretrained $(DEMO_CKPT) --output output/demo

eval-demo: install
	$(PY) main_finetune.py --cfg $(QUICKSTART)/simmim_finetune__swin_tiny__img64__synthetic.yaml \
		--eval --resume $(FINETUNE_RUN)/model_best.pth --output output/demo

probe-demo: install
	$(PY) main_finetune.py --cfg $(QUICKSTART)/simmim_linprobe__swin_tiny__img64__synthetic.yaml \
		--pretrained $(DEMO_CKPT) --output output/demo

test: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-demo:
	rm -rf output/demo

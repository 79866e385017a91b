# fewstep developer commands. On a fresh machine only two are needed:
#   make demo   -- set everything up, run every workflows/api/*.json on the stand-in (or CHECKPOINT=...), images and
#                  plots in out/
#   make test   -- set everything up, lint, and run all four test tiers (math, in-process host, real server, frontend)
# Also: make serve (graph editor on PORT, default 8188), make bench, make docs (the README's plots), make
# screenshots (the README's workflow pictures, from the browser test; needs chromium), make lint,
# make lint-fix, make test-math, make standins, make setup.
SHELL := /bin/bash
PYTHON3 ?= python3
export FEWSTEP_CACHE ?= $(HOME)/.cache/fewstep
VENV_PY := $(FEWSTEP_CACHE)/venv/bin/python
PORT ?= 8188
PYTEST_ARGS ?=

.PHONY: setup standins lint lint-fix test test-math demo docs screenshots serve bench clean

setup:
	@$(PYTHON3) tools/setup_env.py >/dev/null

standins: setup
	@$(VENV_PY) -m tools.standins sd15 >/dev/null

lint: setup
	@$(VENV_PY) -m ruff check --quiet --output-format concise . && echo "fewstep lint: ruff clean"

lint-fix: setup
	$(VENV_PY) -m ruff check --fix .

test: setup standins lint
	$(VENV_PY) -m pytest tests -q $(PYTEST_ARGS)

test-math: setup
	$(VENV_PY) -m pytest tests/math -q $(PYTEST_ARGS)

demo: setup standins
	$(VENV_PY) -m tools.demo

docs: setup
	$(VENV_PY) -m tools.docs_plots docs

# The README's workflow screenshots: the browser test takes one per workflow (out/browser/small/), these are kept.
SCREENSHOTS := fewstep_lora_fuse fewstep_tcd_sdxl_advanced fewstep_lcm_img2img fewstep_style_block_weights
screenshots: setup standins
	$(VENV_PY) -m pytest tests/browser -q
	@for n in $(SCREENSHOTS); do cp out/browser/small/$$n.png docs/workflow_$$n.png; done; ls -l docs/workflow_*.png

serve: setup standins
	$(VENV_PY) -m tools.serve --port $(PORT)

bench: setup standins
	$(VENV_PY) -m bench.run_all

clean:
	rm -rf .cache out

# The two commands: `make demo` (serve + stylize the example pair) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WEIGHTS := weights/vgg19_features.pth
MAR    := model_store/style_transfer.mar
SOURCES := $(wildcard handler/*.py handler/nst/*.py) handler/model-config.yaml scripts/build_mar.sh

.PHONY: help venv weights mar serve stop demo test bench load clean
# A recipe that fails leaves no target behind that a later make would take as built.
.DELETE_ON_ERROR:
help:
	@echo "make demo   - venv, weights, archive, start TorchServe, stylize examples -> out/demo.png"
	@echo "make test   - venv, weights, archive, then the whole test suite"
	@echo "make serve / make stop - start / stop TorchServe with the built archive"
	@echo "make mar    - rebuild model_store/style_transfer.mar"
	@echo "make bench  - benchmark against the reference recipe -> docs/PERFORMANCE.md"
	@echo "make load   - load test with a share of bad requests -> docs/LOAD.md"
	@echo "make weights - (re)write $(WEIGHTS) (ImageNet if reachable, else random)"

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@
venv: $(STAMP)

$(WEIGHTS): | $(STAMP)
	$(BIN)/python scripts/fetch_weights.py --out $(WEIGHTS)
weights: $(STAMP)
	$(BIN)/python scripts/fetch_weights.py --out $(WEIGHTS) $(WEIGHTS_ARGS)

$(MAR): $(WEIGHTS) $(SOURCES) | $(STAMP)
	VENV=$(VENV) scripts/build_mar.sh
mar: $(WEIGHTS) | $(STAMP)
	VENV=$(VENV) scripts/build_mar.sh

serve: $(MAR)
	VENV=$(VENV) scripts/serve.sh start
stop:
	VENV=$(VENV) scripts/serve.sh stop

demo: serve
	mkdir -p out
	$(BIN)/python scripts/stylize.py examples/tubingen.jpg examples/starry_night.jpg -o out/demo.png --max-size 256
	@echo "wrote out/demo.png; TorchServe is still running: 'make stop' stops it"

test: $(MAR)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(MAR)
	$(BIN)/python bench/run.py

load: $(MAR)
	$(BIN)/python bench/load.py $(LOAD_ARGS)

clean:
	rm -rf out $(MAR) weights

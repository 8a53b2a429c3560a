# `make demo` and `make test` each create .venv when missing, install the project and run.
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>" (default: the CPU wheel on disk).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
STAMP      := $(VENV)/.installed-stamp

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check $(TORCH_SPEC) > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(VENV)/bin/python -m pip install --disable-pip-version-check -e '.[dev]' >> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(VENV)/bin/python -c "import torch, lightning, webdataset, av, cv2, safetensors, onnx, onnxruntime, vector_quantize_pytorch"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/flowdistill demo

clean:
	rm -rf $(VENV) build *.egg-info

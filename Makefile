# cloak — two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is not pinned by the package (GPU users keep theirs); this machine kind installs these builds.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install install-man demo test docs lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test,dlib,iqa,faceid,cluster]'
	# facenet-pytorch ships MTCNN weights but pins an old torch: install it without its dependencies.
	$(BIN)/python -m pip install -q --no-deps 'facenet-pytorch>=2.5'
	touch $(STAMP)

# Man pages where `man cloak` finds them (~/.local/share/man is on man's path when ~/.local/bin is on PATH).
PREFIX ?= $(HOME)/.local
MANDIR ?= $(PREFIX)/share/man/man1

install-man:
	install -d "$(MANDIR)"
	install -m 644 man/*.1 "$(MANDIR)"
	@echo "installed $$(ls man/*.1 | wc -l) man pages in $(MANDIR): try 'man cloak'"

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

docs: $(STAMP)
	$(BIN)/python scripts/gen_docs.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_aspl.py

clean:
	rm -rf demo-out .pytest_cache

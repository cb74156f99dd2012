# skr — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEM := $(VENV)/.system-packages
AZURITE := tests/azurite/node_modules/.installed

.PHONY: install run test lint unit unit-fast bench soak clean lock proto

install: $(STAMP) $(SYSTEM) $(AZURITE)

# The venv is rebuilt only when the project's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

# System tools the encfs tests need (FUSE, cryptsetup without device-mapper, mkfs.ext4). Installed with
# apt-get when root; otherwise those tests skip and say why. The stamp is written only once they exist.
ENCFS_TOOLS := cryptsetup fusermount3 mkfs.ext4
$(SYSTEM): | $(STAMP)
	@missing=; for t in $(ENCFS_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 cryptsetup-bin e2fsprogs \
	      >/dev/null) || echo "make: could not install fuse3 cryptsetup-bin e2fsprogs: the encfs tests will skip"; \
	  else echo "make: fuse3 cryptsetup-bin e2fsprogs missing (needs root and apt-get): the encfs tests will skip"; fi; \
	fi; \
	for t in $(ENCFS_TOOLS); do command -v $$t >/dev/null || exit 0; done; touch $@

# Azurite (the Azure Storage emulator) for the encfs end-to-end tests, pinned by tests/azurite/package-lock.json.
# Without node/npm the tests skip and say why; the stamp is written only after a successful npm ci.
$(AZURITE): tests/azurite/package-lock.json
	@if command -v npm >/dev/null; then \
	  (cd tests/azurite && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null && touch node_modules/.installed) \
	    || echo "make: npm ci in tests/azurite failed: the Azurite tests will skip"; \
	else echo "make: npm is missing: the Azurite tests will skip"; fi

run: $(STAMP)
	$(BIN)/skr local --port $${SKR_PORT:-8080}

lint: $(STAMP)
	$(BIN)/ruff check skr tests examples benchmarks
	$(BIN)/ruff format --check skr tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

unit: $(STAMP) $(SYSTEM) $(AZURITE)
	$(BIN)/python -m pytest -q

# The in-process tests only (no sockets, no child processes): seconds, for iterating. CI runs `make test`.
unit-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit -p no:cacheprovider

test: lint unit

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench

soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak

# Refresh the hash-pinned lock files the Dockerfile installs from (needs the package index; commit the
# result). The runtime lock includes the grpc extra, so the image serves --server-type grpc|both. Resolved for this venv's Python (3.11, the Dockerfile's base image). LOCK_ENV keeps a machine's
# pip mirrors and local wheel folders out, so the hashes are those of the public index's files.
LOCK_ENV  ?= PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=
LOCK_ARGS := --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links
lock: $(STAMP)
	$(BIN)/python -m pip install -q 'pip-tools>=7.4,<8'
	$(LOCK_ENV) CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/pip-compile $(LOCK_ARGS) --extra grpc --output-file=requirements.lock pyproject.toml
	$(LOCK_ENV) CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/pip-compile $(LOCK_ARGS) --only-build-deps --build-deps-for=wheel \
		--output-file=requirements-build.lock pyproject.toml
	$(LOCK_ENV) CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/pip-compile $(LOCK_ARGS) --extra encfs --output-file=requirements-encfs.lock pyproject.toml

# Regenerate the checked-in protobuf modules of the gRPC key provider (grpcio-tools, pinned in the test extra).
# Messages only: the server registers its handlers itself, so no *_pb2_grpc.py is generated.
PROTOS := skr/keyprovider/protos/key_provider.proto skr/keyprovider/protos/keyprovider.proto
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. $(PROTOS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis bench.json

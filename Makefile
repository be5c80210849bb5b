# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install what is missing into it.
# torch==2.13.0 goes in FIRST and alone: it is the CPU wheel on this machine's disk,
# while a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.w2w-installed

.PHONY: demo test install clean-venv docker-smoke docker-smoke-local

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@# the browser tests (tests/test_serve.py) need Debian's chromium + chromium-driver: installed here
	@# when missing and apt-get can run (root); otherwise those tests skip and say why
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
	      || echo "warning: apt-get could not install chromium chromium-driver: the browser tests will skip"; \
	  else echo "note: no chromium/chromedriver and no root apt-get: the browser tests will skip"; fi; \
	fi
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/w2w demo

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)

# Build the CPU image and smoke-test it (needs a Docker daemon; see docs/DEPLOY.md): `w2w --help`,
# a synthetic build (no base model, no identity images), status, resume (docker/smoke-run.sh).
# Minutes of CPU: not part of `make test`.
DOCKER ?= docker
IMAGE_CPU ?= w2w:cpu
docker-smoke:
	$(DOCKER) build -f docker/Dockerfile.cpu -t $(IMAGE_CPU) .
	DOCKER=$(DOCKER) bash docker/smoke-run.sh $(IMAGE_CPU)

# The same where no registry and no PyTorch index is reachable (this sandbox): as root, a local
# Debian base (debootstrap) + torch from a wheel on disk; starts dockerd if none runs.
docker-smoke-local:
	bash docker/smoke-local.sh

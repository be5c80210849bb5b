# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install what is missing into it.
# torch==2.13.0 goes in FIRST and alone: it is the CPU wheel on this machine's disk,
# while a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.w2w-installed

.PHONY: demo test install clean-venv docker-smoke

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/w2w demo

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)

# Build the CPU image and smoke-test it (needs a Docker daemon; see docs/DEPLOY.md).
# The synthetic trainer on the SD1.5/tiny layout needs no base model and no identity images.
DOCKER ?= docker
IMAGE_CPU ?= w2w:cpu
docker-smoke:
	$(DOCKER) build -f docker/Dockerfile.cpu -t $(IMAGE_CPU) .
	$(DOCKER) run --rm $(IMAGE_CPU) --help
	$(DOCKER) run --rm $(IMAGE_CPU) build conf/tiny.yaml build.trainer=synthetic build.synthetic_layout=tiny build.synthetic_identities=64 build.out=/tmp/w2w-smoke build.workers=2 --no-progress

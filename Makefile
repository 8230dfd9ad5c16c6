# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
XLA8 := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: install demo test bench lint clean system-deps wheelhouse image test-image

install: $(STAMP)

# requirements.lock is the one source of truth for versions (the Dockerfile installs it too).
$(STAMP): requirements.lock requirements-test.txt pyproject.toml integrations/wandb/pyproject.toml integrations/mlflow/pyproject.toml \
		integrations/tensorboard/pyproject.toml integrations/lm_harness/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps -e . -e integrations/wandb -e integrations/mlflow \
		-e integrations/tensorboard -e integrations/lm_harness
	touch $(STAMP)

# Chromium renders the MLflow and TensorBoard UIs in the browsing tests, the ledger's tests run a
# PostgreSQL server, and make image needs an OCI builder; each is installed when missing and we may.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the UI tests will say what is missing"; \
	  else echo "note: chromium missing; install the Debian package 'chromium' for the UI tests"; fi; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	      || echo "warning: could not install postgresql; the ledger's PostgreSQL tests will say what is missing"; \
	  else echo "note: PostgreSQL missing; install the Debian package 'postgresql' for the ledger's tests"; fi; }
	@{ command -v buildah && command -v podman && command -v debootstrap; } >/dev/null 2>&1 \
	  || docker info >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap >/dev/null) \
	      || echo "warning: could not install podman, buildah, debootstrap; make image will say what is missing"; \
	  else echo "note: no OCI builder; install docker, or the Debian packages podman buildah debootstrap, for make image"; fi; }

# A wheel of every locked package and of the build backend, for installs that reach no index: the
# image build (container/build.sh), air-gapped hosts (README, "Installing without internet").
ACCELERATOR ?= cpu
WHEELHOUSE_STAMP := wheelhouse/.complete-$(ACCELERATOR)
wheelhouse: $(WHEELHOUSE_STAMP)

$(WHEELHOUSE_STAMP): requirements.lock pyproject.toml | $(STAMP)
	$(BIN)/python -m pip wheel -q --wheel-dir wheelhouse -r requirements.lock 'setuptools>=68' wheel
	if [ "$(ACCELERATOR)" = cuda12 ]; then \
	  $(BIN)/python -m pip wheel -q --wheel-dir wheelhouse -c requirements.lock \
	    "jax[cuda12]==$$(sed -n 's/^jax==//p' requirements.lock)"; fi
	touch $@

# The image from the Dockerfile as shipped, with docker or podman/buildah: localhost/tracker-eval:cpu
# and build/tracker-eval-cpu.oci.tar (ACCELERATOR=cuda12 for the CUDA variant).
image: wheelhouse
	ACCELERATOR=$(ACCELERATOR) container/build.sh

demo: install
	$(BIN)/tracker-eval demo

# Lint first: it takes a second and fails before the suite starts. Two pytest-xdist workers, one
# test module each at a time (module-scoped servers stay in one worker): CI machines have 2 cores.
# Then the image: built from the Dockerfile (`make image`) and run as a container (tests/image/).
test: install system-deps lint
	$(XLA8) $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 \
		--ignore=tests/image tests
	$(MAKE) test-image

test-image: image
	$(BIN)/python -m pytest -q -p no:cacheprovider -s --durations=5 tests/image

lint: install
	$(BIN)/ruff check --no-cache .

bench: install
	$(XLA8) $(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) runs bench .pytest_cache

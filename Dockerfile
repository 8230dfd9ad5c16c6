# tracker-eval: watches an Orbax checkpoint directory and evaluates every new checkpoint.
#
#   docker build -t tracker-eval:cpu .                                       # CPU jaxlib (default)
#   docker build --build-arg ACCELERATOR=cuda12 -t tracker-eval:cuda12 .     # + CUDA 12 plugin of the same jax
#   make image                                     # any OCI builder (docker, podman/buildah), offline from wheelhouse/
#
# The Python environment comes from requirements.lock, the same file `make install` reads; the
# build stage fills a venv that the runtime stage copies, so compilers and pip caches stay behind.
# Secrets (WANDB_API_KEY, MLFLOW_TRACKING_USERNAME/PASSWORD, ...) are runtime env only: see README.md, "Deployment".
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# cpu | cuda12. The CUDA wheels (jax-cuda12-plugin with the nvidia-* libraries) bring their own CUDA
# runtime; the host only needs an NVIDIA driver and the container toolkit.
ARG ACCELERATOR=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.lock ./
# wheelhouse/ is empty in the repository, and pip then installs from the package index. Filled by
# `make wheelhouse`, it is the only source: the build needs no index (air-gapped hosts, sandboxed
# builders whose network or pip settings are not the host's). The setting lives in the build stage only.
COPY wheelhouse/ /wheelhouse/
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
      printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > /etc/pip.conf; \
    fi \
    && pip install --no-cache-dir --no-compile -r requirements.lock
# The CUDA plugin must match the locked jax exactly; the lock also constrains everything else.
RUN if [ "$ACCELERATOR" = cuda12 ]; then \
      jax_version="$(sed -n 's/^jax==//p' requirements.lock)" \
      && test -n "$jax_version" \
      && pip install --no-cache-dir --no-compile -c requirements.lock "jax[cuda12]==${jax_version}"; \
    elif [ "$ACCELERATOR" != cpu ]; then \
      echo "ACCELERATOR must be cpu or cuda12, got '$ACCELERATOR'" >&2 && exit 1; \
    fi
COPY pyproject.toml ./
COPY tracker_eval ./tracker_eval
COPY integrations ./integrations
COPY container/slim_venv.py ./
# Bytecode only for what a container imports, no bundled test suites: container/slim_venv.py says why.
RUN pip install --no-cache-dir --no-compile --no-deps . ./integrations/wandb ./integrations/mlflow \
      ./integrations/tensorboard ./integrations/lm_harness \
    && pip check \
    && python slim_venv.py

FROM ${PYTHON_IMAGE}
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" tracker \
    && useradd --system --uid "${APP_UID}" --gid tracker --home-dir /home/tracker --create-home \
       --shell /usr/sbin/nologin tracker \
    && mkdir -p /output /config /checkpoints \
    && chown tracker:tracker /output
COPY --from=build /opt/venv /opt/venv
# Everything tracker-eval, W&B and matplotlib write goes to /output, the user's home or /tmp; with a
# read-only root filesystem, mount writable volumes at /tmp and /home/tracker (the Kubernetes recipes do).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/tracker \
    MPLCONFIGDIR=/tmp/matplotlib \
    WANDB_DIR=/output \
    WANDB_CACHE_DIR=/home/tracker/.cache/wandb \
    WANDB_CONFIG_DIR=/home/tracker/.config/wandb \
    GIT_PYTHON_REFRESH=quiet
USER ${APP_UID}:${APP_UID}
WORKDIR /output
VOLUME ["/output"]
# The watcher records a heartbeat in its ledger under output_dir; status --health exits 0 only if
# that heartbeat is recent, so a wedged watcher turns the container unhealthy.
HEALTHCHECK --interval=60s --timeout=30s --start-period=300s --retries=3 \
    CMD ["tracker-eval", "status", "--config", "/config/watch.yaml", "--health"]
ENTRYPOINT ["tracker-eval"]
CMD ["watch", "--config", "/config/watch.yaml"]

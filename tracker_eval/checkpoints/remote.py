"""How the storage clients under Orbax behave on object storage: fresh listings, bounded waits.

    fresh_remote_listings("gs://bucket/run")   # any process reading gs:// steps: no stale listings
    bound_storage_waits("gs://bucket/run")     # `tracker-eval watch`/`eval` processes: fail in seconds

Orbax reads `gs://` through two clients. Metadata (exists, small JSON files) goes through
etils.epath -> fsspec -> gcsfs; array data through TensorStore. Their defaults suit a training
job that must not lose a save, not a watcher that should notice an outage and come back later:

- gcsfs caches directory listings per process. A watcher that listed `run/` when it held step 20
  then finds step 40 "missing" (fsspec answers from the cached listing), which would skip it as
  deleted. `fresh_remote_listings` turns the cache off before the first gs:// use.
- gcsfs retries a dead server 6 times (~33 s per call, and a restore makes several calls);
  TensorStore retries 32 times with up to 32 s between tries (~15 min). `bound_storage_waits`
  brings a failed restore down to seconds: the watcher marks the step and tries again at a later
  poll, which is its own, coarser retry.

`bound_storage_waits` changes process-wide settings of those libraries (two of them private), so
only tracker-eval's own processes call it, never a training process running
`InTrainingEvaluation`: a training job keeps the libraries' patient defaults for its saves.
"""

from __future__ import annotations

import logging
import os

from tracker_eval.locations import is_url

LOG = logging.getLogger(__name__)

# TensorStore's GCS retries while reading array data: ~0.5 + 1 + 2 + 4 s of backoff in all.
TS_GCS_RETRIES = {"max_retries": 4, "initial_delay": "0.5s", "max_delay": "4s"}
# gcsfs attempts per request (its default is 6, ~33 s against a dead server); 3 take ~3-5 s.
GCSFS_ATTEMPTS = 3
# A gcsfs request (small metadata files only) or a TensorStore transfer stalled this long fails.
STALL_TIMEOUT_S = 30

_bounded = False


def fresh_remote_listings(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Turns gcsfs's per-process listing cache off, once, before a gs:// checkpoint is read.

    Set through fsspec's configuration, which every gcsfs instance created afterwards (etils.epath
    creates its own) takes as defaults; FSSPEC_GCS_USE_LISTINGS_CACHE=false does the same from the
    environment.
    """
    if not os.fspath(checkpoint_dir).startswith("gs://"):
        return
    import fsspec.config  # noqa: PLC0415 - only for gs://

    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


def bound_storage_waits(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Bounds how long gcsfs and TensorStore retry or wait on object storage, in this process.

    Idempotent. Call it before the first gs:// read; settings the libraries read once (the
    TensorStore HTTP transport's stall limit) are only set when the environment does not set them.
    A library whose private hook moved in a later version is left at its defaults, with a debug
    line saying so. A local `checkpoint_dir` needs none of it, and gcsfs (over half a second to
    import) is then never imported.

    Args:
      checkpoint_dir: where the checkpoints are; only a URL (gs://, ...) changes anything.
    """
    global _bounded
    if _bounded or not is_url(checkpoint_dir):
        return
    _bounded = True
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(STALL_TIMEOUT_S))
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
    _bound_tensorstore_retries()
    _bound_gcsfs()


def _bound_tensorstore_retries() -> None:
    # Orbax builds every TensorStore context from deep copies of these two dicts and takes no
    # context argument in its public API (orbax-checkpoint 0.12.8).
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils  # noqa: PLC0415

        contexts = (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT)
    except (ImportError, AttributeError) as error:
        LOG.debug("TensorStore GCS retries left at their defaults: %s", error)
        return
    for context in contexts:
        context["gcs_request_retries"] = dict(TS_GCS_RETRIES)


def _bound_gcsfs() -> None:
    try:
        import fsspec.config  # noqa: PLC0415
        from gcsfs import core, retry  # noqa: PLC0415
    except ImportError as error:
        LOG.debug("gcsfs not installed: %s", error)
        return
    fsspec.config.conf.setdefault("gcs", {}).setdefault("requests_timeout", STALL_TIMEOUT_S)
    # gcsfs fixes its retry count when the class is defined (@retry_request(retries=6) on
    # _request); GCSFileSystem.retries has no effect. Wrap the undecorated method again.
    request = getattr(core.GCSFileSystem._request, "__wrapped__", None)
    if request is None:
        LOG.debug("gcsfs retries left at their default: GCSFileSystem._request is not wrapped as expected")
        return
    core.GCSFileSystem._request = retry.retry_request(retries=GCSFS_ATTEMPTS)(request)

"""Keeps lm-eval and Hugging Face `datasets` off the network and out of the user's caches.

    prepare_environment()                  # before anything imports `datasets` (lm_eval.evaluator does)

`datasets` reads HF_DATASETS_OFFLINE and HF_HUB_OFFLINE when it is imported, and without them a
local `load_dataset("json")` still sends a usage request out. Its arrow cache goes to a temporary
folder of this process, removed at exit, instead of ~/.cache/huggingface. Bootstrap stderrs run in
this process instead of a forked pool.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

_cache_dir: str | None = None


def prepare_environment() -> str:
    """Sets the offline switches and a private cache folder for this process (idempotent).

    Returns:
      The temporary folder holding HF_HOME and HF_DATASETS_CACHE.
    """
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = tempfile.mkdtemp(prefix="tracker-eval-hf-")
        atexit.register(shutil.rmtree, _cache_dir, True)
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Bootstrap stderr forks a multiprocessing pool otherwise: forking a process that runs JAX
        # threads can deadlock. The single-process path draws the same seeded resamples.
        os.environ["DISABLE_MULTIPROC"] = "1"
        os.environ["HF_HOME"] = os.path.join(_cache_dir, "hf_home")
        os.environ["HF_DATASETS_CACHE"] = os.path.join(_cache_dir, "datasets")
        _patch_imported()
    return _cache_dir


def _patch_imported() -> None:
    """When `datasets` or `huggingface_hub` was imported before us (by user code), their import-time
    reading of the switches is past: set the module constants they consult instead."""
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_DATASETS_OFFLINE = True
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_CACHE = type(config.HF_DATASETS_CACHE)(os.environ["HF_DATASETS_CACHE"])

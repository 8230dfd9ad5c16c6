"""A cold start imports only what the config uses: no gcsfs for a local checkpoint_dir, no flax.nnx
for a linen model, no scikit-learn for the digits data. Real `tracker-eval eval` runs in
subprocesses; how long a cold start takes is `benchmarks/bench_startup.py`'s `cold_start_vs_import_floor`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from watcher_harness import child_env, write_config

from tracker_eval.tasks import classification

pytest_plugins = ["watcher_harness"]

# Runs the command line in this process, then names the optional libraries that were imported.
_PROBE = """
import json, sys
from tracker_eval.cli import main
code = main(sys.argv[1:])
optional = ("gcsfs", "fsspec", "flax.nnx", "sklearn", "mlflow", "wandb", "psycopg")
print(json.dumps({"code": code, "imported": sorted(m for m in optional if m in sys.modules)}))
"""


@pytest.mark.parametrize(("model", "imported"), [("make_model", []), ("make_nnx_model", ["flax.nnx"])])
def test_a_local_eval_imports_only_what_its_config_uses(tmp_path, source_checkpoints, model, imported):
    config = write_config(tmp_path, watch={}, checkpoint_dir=source_checkpoints, loggers=[{"type": "console"}])
    proc = subprocess.run([sys.executable, "-c", _PROBE, "eval", "--config", str(config), "--step", "20",
                           f"model=tracker_eval.tasks.classification:{model}", "data_kwargs={limit: 64}"],
                          capture_output=True, text=True, timeout=300, env=child_env(devices=1))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "imported": imported}, proc.stderr


def test_the_digits_read_from_scikit_learns_file_are_its_load_digits():
    from sklearn.datasets import load_digits

    expected = load_digits()
    order = np.random.RandomState(0).permutation(len(expected.target))
    features, labels = classification.load_digits()
    np.testing.assert_array_equal(features, (expected.data[order] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, expected.target[order].astype(np.int32))

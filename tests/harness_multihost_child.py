"""One process of a 2-process harness run (tests/test_harness.py): two checkpoints, results to a file.

    python tests/harness_multihost_child.py PORT PROCESS_ID TASK_DIR OUT.json
"""

from __future__ import annotations

import json
import sys


def main(port: str, process_id: str, task_dir: str, out: str) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id), initialization_timeout=60, heartbeat_timeout_seconds=30)
    from harness_config import suite_options
    from tracker_eval_lm_harness.suite import HarnessSuite

    from tracker_eval.config import MeshConfig
    from tracker_eval.evaluation.models import adapt_model
    from tracker_eval.evaluation.sharding import make_mesh
    from tracker_eval.tasks import language_model as lm_task

    model = lm_task.make_model()
    suite = HarnessSuite(HarnessSuite.Config.from_mapping(suite_options(task_dir)), adapter=adapt_model(model),
                         mesh=make_mesh(MeshConfig(4, 2, 1)), name="mh")
    runs = []
    for seed in (3, 4):
        result = suite.run(lm_task.init_params(model, seed=seed), step=seed)
        runs.append({"metrics": result.metrics, "samples": result.samples, "provenance": result.provenance})
    with open(out, "w") as f:
        json.dump(runs, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

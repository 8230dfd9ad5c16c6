"""One process of a 2-process harness run (tests/test_harness.py); results to a file.

    python tests/harness_multihost_child.py PORT PROCESS_ID TASK_DIR OUT.json

Runs, in order: the params of seed 3, of seed 4; seed 3 again with process 1 failing inside the
engine after its first group of batches (both processes must raise, none may wait in a broadcast);
seed 4 again (the job goes on); seed 3 with a stop requested on process 0 after its first group
(both abandon). Then, with answers kept beside OUT.json: seed 3 stopped half-way through its groups,
and seed 3 again (the resumed attempt). Each run's metrics or error, and the time it ended, go to
OUT.json; process 0 adds the key-value store's keys left at the end.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time


def main(port: str, process_id: str, task_dir: str, out: str) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id), initialization_timeout=60, heartbeat_timeout_seconds=30)
    from harness_config import suite_options
    from jax.experimental import multihost_utils
    from tracker_eval_lm_harness.suite import HarnessSuite

    from tracker_eval import kvstore
    from tracker_eval.config import MeshConfig
    from tracker_eval.evaluation import agreement
    from tracker_eval.evaluation.models import adapt_model
    from tracker_eval.evaluation.sharding import make_mesh
    from tracker_eval.tasks import language_model as lm_task

    model = lm_task.make_model()
    suite = HarnessSuite(HarnessSuite.Config.from_mapping(suite_options(task_dir)), adapter=adapt_model(model),
                         mesh=make_mesh(MeshConfig(4, 2, 1)), name="mh")
    executable = suite.engine._executable
    calls = [0]
    fail_after: list[int | None] = [None]  # process 1 raises at this call of the engine's program lookup

    def failing_executable(params, width):
        calls[0] += 1
        if fail_after[0] is not None and calls[0] > fail_after[0]:
            fail_after[0] = None
            runs[-1]["failed_at"] = time.time()
            raise RuntimeError("injected engine failure on process 1")
        return executable(params, width)

    suite.engine._executable = failing_executable
    groups = [0]
    real_check = suite.engine.check_stop

    def counting_check():
        groups[0] += 1
        real_check()

    suite.engine.check_stop = counting_check
    runs: list[dict] = []
    whole = [0]  # groups of an uninterrupted run
    for seed, mode in ((3, ""), (4, ""), (3, "fail"), (4, ""), (3, "stop"), (3, "resume-stop"), (3, "resume")):
        runs.append({"seed": seed, "mode": mode})
        if mode == "fail" and jax.process_index() == 1:
            fail_after[0] = calls[0] + 1
        if mode.startswith("resume"):  # process 0 keeps the answers; the others follow it as ever
            suite.output_dir, suite.stream = str(pathlib.Path(out).parent / "answers"), "mh-stream"
        stop_after = groups[0] + (whole[0] // 2 if mode == "resume-stop" else 1)
        before = groups[0]
        try:
            result = suite.run(lm_task.init_params(model, seed=seed), step=seed,
                               should_abort=(lambda limit=stop_after: groups[0] > limit) if "stop" in mode else None)
            whole[0] = whole[0] or groups[0] - before
            runs[-1].update(metrics=result.metrics, samples=result.samples, provenance=result.provenance)
        except Exception as error:  # noqa: BLE001 - the test reads what each process raised
            runs[-1]["error"] = f"{type(error).__name__}: {error}"
        runs[-1]["ended_at"] = time.time()
    multihost_utils.sync_global_devices("harness child done")  # every follower closed every run
    keys: list[str] = []
    if jax.process_index() == 0:
        client = kvstore.client()
        agreement.delete_finished(client)
        keys = sorted(kvstore.keys_under(client, "tracker_eval"))
    with open(out, "w") as f:
        json.dump({"runs": runs, "keys": keys}, f)
    multihost_utils.sync_global_devices("harness child written")


if __name__ == "__main__":
    main(*sys.argv[1:])

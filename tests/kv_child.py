"""One process of a 2-process job that exercises the key-value store the way a watcher does.

    python kv_child.py PROCESS_ID PORT OUT_JSON

300 idle decisions, then three evaluations of the digits MLP with per-example rows, the second
failing on process 1 after one batch, with a decision between each. Process 0 writes what the
store holds after the idle polls and at the end, the client's method signatures, and the rows and
errors of each evaluation, to OUT_JSON for tests/test_multihost.py to check.
"""

from __future__ import annotations

import json
import sys
import time

import jax

from tracker_eval.config import DistributedConfig, MeshConfig

IDLE_POLLS = 300


def main() -> None:
    process, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from tracker_eval.runners import distributed  # noqa: PLC0415

    distributed.initialize(DistributedConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                             process_id=process, heartbeat_timeout_s=10,
                                             initialization_timeout_s=60))
    from tracker_eval import kvstore  # noqa: PLC0415
    from tracker_eval.evaluation import agreement  # noqa: PLC0415

    client = kvstore.client()
    report: dict = {"signatures": {name: getattr(type(client), name).__doc__ for name in kvstore.METHODS}}
    channel = distributed.DecisionChannel(namespace="tracker_eval/test/decisions")
    for _ in range(IDLE_POLLS):
        channel.exchange(-1)
    if process == 0:  # process 0 runs ahead of its follower here (a watcher waits between polls)
        _wait_read(client, channel)
    channel.exchange(-1)  # process 0 deletes what every follower has read
    report["keys_after_idle_polls"] = sorted(kvstore.keys_under(client, "tracker_eval"))

    evaluation, params = _evaluation()
    report["evaluations"] = []
    for step in (1, 2, 3):
        channel.exchange(step)
        try:
            result = evaluation.evaluate(_state(params, step), _data(process, failing=step == 2))
            report["evaluations"].append({"step": step, "rows": result.per_example["example_loss"].tolist()
                                          if process == 0 else None, "loss": result.metrics["loss"]})
        except Exception as error:  # noqa: BLE001 - the test reads what each process raised
            report["evaluations"].append({"step": step, "error": f"{type(error).__name__}: {error}"})
    channel.exchange(0)
    if process == 0:
        _wait_read(client, channel)  # so process 1 is done with every evaluation
        report["pending"] = agreement.delete_finished(client)
        report["keys_at_end"] = sorted(kvstore.keys_under(client, "tracker_eval"))
        report["params"] = jax.tree.map(lambda a: a.tolist(), params)
    with open(f"{out}.{process}", "w") as f:
        json.dump(report, f)
    channel.exchange(0)  # process 0 keeps the coordination service up until process 1 has written


def _wait_read(client, channel):
    from tracker_eval import kvstore  # noqa: PLC0415

    deadline = time.monotonic() + 60
    while kvstore.try_get(client, "tracker_eval/test/decisions-read/1") != str(channel.seq):
        assert time.monotonic() < deadline, "process 1 never read the last decision"
        time.sleep(0.05)


def _evaluation():
    from tracker_eval.evaluation import ExtendedEvaluation, make_mesh  # noqa: PLC0415
    from tracker_eval.tasks import classification  # noqa: PLC0415

    model = classification.make_model()
    params = classification.init_params(model, seed=3)
    evaluation = ExtendedEvaluation(model=model, mesh=make_mesh(MeshConfig()), batch_size=40,
                                    eval_function=classification.eval_function, progress=False)
    return evaluation, params


def _state(params, step):
    from tracker_eval.evaluation import EvalState  # noqa: PLC0415

    return EvalState.create(apply_fn=None, params=params, step=step, rng=jax.random.key(0))


def _data(process, *, failing):
    from tracker_eval.tasks import classification  # noqa: PLC0415

    batches = classification.make_eval_data(split="validation", batch_size=40, process_index=process,
                                            process_count=2, limit=150)
    for index, batch in enumerate(batches):
        if failing and process == 1 and index == 1:
            raise OSError("injected read error on process 1")
        yield batch


if __name__ == "__main__":
    main()

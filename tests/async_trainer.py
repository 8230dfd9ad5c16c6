"""A training process that saves the way Orbax does by default: asynchronously, with large arrays.

    python async_trainer.py CKPT_DIR PARAMS_DIR --steps 10 20 30 --ballast-floats 48000000

It trains the digits classifier with Adam and saves `{params, opt_state, step, ballast}` with a
default `CheckpointManager` (`enable_async_checkpointing=True`): `save()` returns at once and Orbax
writes `<step>.orbax-checkpoint-tmp` in the background, renaming it to `<step>` when finished, while
training goes on. The ballast (random float32, incompressible) makes each save take over a second.
For every save it prints one JSON line: whether the save was still in flight when `save()` returned,
and how long Orbax took to finalize it. The saved params go to ``PARAMS_DIR/<step>.npz`` for an
independent numpy reference.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

from tracker_eval.tasks import classification


def _finalized_after(path: pathlib.Path, started: float, into: dict[str, float]) -> threading.Thread:
    def watch() -> None:
        while not path.exists():
            time.sleep(0.005)
        into["finalize_s"] = round(time.monotonic() - started, 3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir", type=pathlib.Path)
    parser.add_argument("params_dir", type=pathlib.Path)
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--ballast-floats", type=int, default=48_000_000)
    args = parser.parse_args()
    args.params_dir.mkdir(parents=True, exist_ok=True)

    model = classification.make_model()
    state = train_state.TrainState.create(apply_fn=model.apply, params=classification.init_params(model, seed=0),
                                          tx=optax.adam(0.01))
    x, y = classification.split_digits("train")
    rng = np.random.RandomState(0)
    ballast = jax.random.normal(jax.random.key(0), (args.ballast_floats,), jnp.float32)

    @jax.jit
    def train_step(state: train_state.TrainState, batch_x: jax.Array, batch_y: jax.Array) -> train_state.TrainState:
        def loss_fn(params: object) -> jax.Array:
            return jnp.mean(classification.cross_entropy(state.apply_fn({"params": params}, batch_x), batch_y))

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    watchers = []
    reports: list[dict[str, object]] = []
    with ocp.CheckpointManager(os.fspath(args.checkpoint_dir.absolute())) as manager:  # async by default
        for step in range(1, max(args.steps) + 1):
            index = rng.randint(0, len(y), 64)
            state = train_step(state, x[index], y[index])
            if step not in args.steps:
                continue
            flat = {"/".join(str(k.key) for k in path): np.asarray(leaf)
                    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
            np.savez(args.params_dir / f"{step}.npz", **flat)
            report: dict[str, object] = {"step": step}
            started = time.monotonic()
            manager.save(step, args=ocp.args.StandardSave(
                {"params": state.params, "opt_state": state.opt_state, "step": state.step, "ballast": ballast + step}))
            final = args.checkpoint_dir / str(step)
            report["in_flight"] = not final.exists() and any(
                p.name.startswith(f"{step}.orbax-checkpoint-tmp") for p in args.checkpoint_dir.iterdir())
            watchers.append(_finalized_after(final, started, report))
            reports.append(report)
        manager.wait_until_finished()
    for thread in watchers:
        thread.join(timeout=60)
    for report in reports:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

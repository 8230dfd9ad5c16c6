"""A small real training loop for the digits classifier that writes Orbax checkpoints.

Used by `tracker-eval demo` and the tests: it writes checkpoints exactly as a user's training job
would (a CheckpointManager saving params, Adam state and step), so the watcher sees real ones.

    train_classifier("runs/demo/checkpoints", steps=200, save_every=20,
                     after_save=lambda step, state: ...)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from tracker_eval.locations import normalize_checkpoint_dir
from tracker_eval.tasks import classification


def train_classifier(
    checkpoint_dir: str | os.PathLike[str],
    *,
    steps: int,
    save_every: int,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    hidden: int = 64,
    seed: int = 0,
    after_save: Callable[[int, train_state.TrainState], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    save_steps: list[int] | None = None,
) -> train_state.TrainState:
    """Trains the MLP with Adam and saves a checkpoint every `save_every` steps.

    Args:
      checkpoint_dir: the CheckpointManager root to write.
      steps: training steps.
      save_every: checkpoint interval (the final step is saved too).
      batch_size: training batch size.
      learning_rate: optimizer step size.
      hidden: hidden width of the MLP.
      seed: init and data-order seed.
      after_save: called with (step, state) after each save returns (in-training evaluation hook).
      on_step: called with (step, loss) after each step (progress display).
      save_steps: explicit steps to save instead of every `save_every`.

    Returns:
      The final train state.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    model = classification.make_model(hidden=hidden)
    params = classification.init_params(model, seed=seed)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(learning_rate))
    x, y = classification.split_digits("train")
    rng = np.random.RandomState(seed)

    @jax.jit
    def train_step(state: train_state.TrainState, batch_x: jax.Array, batch_y: jax.Array) -> tuple[Any, jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            logits = state.apply_fn({"params": params}, batch_x)
            return jnp.mean(classification.cross_entropy(logits, batch_y))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    wanted = set(save_steps) if save_steps is not None else {
        s for s in range(1, steps + 1) if s % save_every == 0 or s == steps
    }
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False)
    with ocp.CheckpointManager(normalize_checkpoint_dir(checkpoint_dir), options=options) as manager:
        for step in range(1, steps + 1):
            index = rng.randint(0, len(y), batch_size)
            state, loss = train_step(state, x[index], y[index])
            if on_step is not None:
                on_step(step, float(loss))
            if step in wanted:
                manager.save(step, args=ocp.args.StandardSave(
                    {"params": state.params, "opt_state": state.opt_state, "step": state.step}
                ))
                manager.wait_until_finished()
                if after_save is not None:
                    after_save(step, state)
    return state

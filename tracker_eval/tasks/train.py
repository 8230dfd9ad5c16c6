"""Small real training loops (digits classifier, byte-level LM) that write Orbax checkpoints.

Used by `tracker-eval demo` and the tests: they write checkpoints exactly as a user's training job
would (a CheckpointManager saving params, Adam state and step), so the watcher sees real ones.

    train_classifier("runs/demo/checkpoints", steps=200, save_every=20,
                     after_save=lambda step, state: ...)
    train_language_model("runs/lm/checkpoints", steps=300, save_every=50)   # on pydoc's topics
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
from tracker_eval.tasks import classification, language_model


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

    model = classification.make_model(hidden=hidden)
    params = classification.init_params(model, seed=seed)
    x, y = classification.split_digits("train")
    rng = np.random.RandomState(seed)

    def loss_fn(apply_fn: Callable[..., Any], params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        logits = apply_fn({"params": params}, batch[0])
        return jnp.mean(classification.cross_entropy(logits, batch[1]))

    def next_batch() -> tuple[np.ndarray, np.ndarray]:
        index = rng.randint(0, len(y), batch_size)
        return x[index], y[index]

    return _train(checkpoint_dir, model=model, params=params, learning_rate=learning_rate, loss_fn=loss_fn,
                  next_batch=next_batch, steps=steps, save_every=save_every, after_save=after_save,
                  on_step=on_step, save_steps=save_steps)


def train_language_model(
    checkpoint_dir: str | os.PathLike[str],
    *,
    steps: int,
    save_every: int,
    batch_size: int = 32,
    seq_len: int = 128,
    learning_rate: float = 0.003,
    width: int = 64,
    corpus: str = "pydoc",
    seed: int = 0,
    after_save: Callable[[int, train_state.TrainState], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    save_steps: list[int] | None = None,
) -> train_state.TrainState:
    """Trains the byte-level TinyLM with Adam on random windows of a corpus' train split.

    Args:
      checkpoint_dir: the CheckpointManager root to write.
      steps: training steps.
      save_every: checkpoint interval (the final step is saved too).
      batch_size: windows per step.
      seq_len: bytes per window.
      learning_rate: optimizer step size.
      width: the model's width.
      corpus: pydoc (Python's help topics; the harness demo tasks use its held-out topics) or sklearn.
      seed: init and data-order seed.
      after_save: called with (step, state) after each save returns.
      on_step: called with (step, loss) after each step.
      save_steps: explicit steps to save instead of every `save_every`.

    Returns:
      The final train state.
    """
    model = language_model.make_model(width=width)
    params = language_model.init_params(model, seq_len=seq_len, seed=seed)
    text = np.frombuffer(language_model.split_text("train", corpus_name=corpus), np.uint8).astype(np.int32)
    rng = np.random.RandomState(seed)

    def loss_fn(apply_fn: Callable[..., Any], params: Any, batch: np.ndarray) -> jax.Array:
        logits = apply_fn({"params": params}, batch[:, :-1])
        return jnp.mean(language_model.token_losses(logits, batch[:, 1:]))

    def next_batch() -> np.ndarray:
        starts = rng.randint(0, len(text) - seq_len - 1, batch_size)
        return text[starts[:, None] + np.arange(seq_len + 1)[None, :]]

    return _train(checkpoint_dir, model=model, params=params, learning_rate=learning_rate, loss_fn=loss_fn,
                  next_batch=next_batch, steps=steps, save_every=save_every, after_save=after_save,
                  on_step=on_step, save_steps=save_steps)


def _train(
    checkpoint_dir: str | os.PathLike[str],
    *,
    model: Any,
    params: Any,
    learning_rate: float,
    loss_fn: Callable[[Callable[..., Any], Any, Any], jax.Array],
    next_batch: Callable[[], Any],
    steps: int,
    save_every: int,
    after_save: Callable[[int, train_state.TrainState], None] | None,
    on_step: Callable[[int, float], None] | None,
    save_steps: list[int] | None,
) -> train_state.TrainState:
    """The shared loop: Adam steps, a CheckpointManager save of params, Adam state and step."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(learning_rate))

    @jax.jit
    def train_step(state: train_state.TrainState, batch: Any) -> tuple[Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda p: loss_fn(state.apply_fn, p, batch))(state.params)
        return state.apply_gradients(grads=grads), loss

    wanted = set(save_steps) if save_steps is not None else {
        s for s in range(1, steps + 1) if s % save_every == 0 or s == steps
    }
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False)
    with ocp.CheckpointManager(normalize_checkpoint_dir(checkpoint_dir), options=options) as manager:
        for step in range(1, steps + 1):
            state, loss = train_step(state, next_batch())
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

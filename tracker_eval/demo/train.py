"""The demo's training process: trains the digits classifier (or the byte LM) and writes Orbax checkpoints.

    python -m tracker_eval.demo.train --checkpoint-dir runs/demo/checkpoints --steps 200 --save-every 20
    python -m tracker_eval.demo.train --task language_model ...   # TinyLM on Python's pydoc topics

With `--in-training-config` it also evaluates every other checkpoint itself through
`InTrainingEvaluation`, sharing the watcher's ledger (the watcher then skips those steps).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from tracker_eval.logs import configure_logging, quiet_environment  # noqa: PLC0415

    quiet_environment()
    parser = argparse.ArgumentParser(prog="tracker_eval.demo.train")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument("--in-training-config", default=None)
    parser.add_argument("--task", choices=("classifier", "language_model"), default="classifier")
    args = parser.parse_args(argv)
    configure_logging(verbose=False)

    from tracker_eval.tasks.train import train_classifier, train_language_model  # noqa: PLC0415

    evaluation = None
    if args.in_training_config:
        from tracker_eval import InTrainingEvaluation  # noqa: PLC0415

        evaluation = InTrainingEvaluation.from_config(args.in_training_config)
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)

    def after_save(step: int, state: object) -> None:
        recent = sum(losses[-args.save_every:]) / max(1, len(losses[-args.save_every:]))
        note = ""
        if evaluation is not None and (step // args.save_every) % 2 == 0:
            result = evaluation.after_checkpoint(step=step, train_state=state)
            if isinstance(result, dict):  # a config with suites: the first suite's loss
                result = next(iter(result.values()), None)
            if result is not None:
                note = f", evaluated in-training: loss {result.metrics['loss']:.4f}"
        print(f"train: step {step:>4}/{args.steps}  train loss {recent:.4f}  checkpoint saved{note}", flush=True)

    try:
        train = train_classifier if args.task == "classifier" else train_language_model
        train(args.checkpoint_dir, steps=args.steps, save_every=args.save_every, learning_rate=args.learning_rate,
              on_step=on_step, after_save=after_save)
    finally:
        if evaluation is not None:
            evaluation.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

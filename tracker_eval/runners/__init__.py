"""Runners: what puts the stages together and runs them, as a command or inside training.

`pipeline` (config -> restored params -> one EvalResult per suite), `suites` (suite kinds: the
built-in eval and plug-ins), `stream` (ledgers, loggers and delivery of one stream on process 0),
`delivery` (outbox worker threads), `one_shot` (`tracker-eval eval`), `watcher` (`tracker-eval
watch`), `schedule` (which step and suites the watcher claims next),
`in_training` (InTrainingEvaluation), `claim` (keeps an evaluation claim alive, for both),
`status` (`tracker-eval status`), `retry` (`tracker-eval retry`), `distributed` (JAX runtime
start-up, process-0 decisions, peer monitor). Comparing steps: `pairing` (per-example values of two
results by example identity), `compare` (`tracker-eval compare`), `gate` (`tracker-eval gate`),
`best` (the best step against the runner-up), `alerts` (`watch.alerts`).

May import: every stage below (checkpoints, evaluation, ledger, loggers) and the shared top level.
Public names: Pipeline, Watcher, InTrainingEvaluation, PrimaryStream, collect_status.
"""

from tracker_eval.imports import lazy_exports

_EXPORTS = {
    "Pipeline": "pipeline",
    "Watcher": "watcher",
    "InTrainingEvaluation": "in_training",
    "PrimaryStream": "stream",
    "collect_status": "status",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Loggers: the protocol every tracker implements, and the machinery that feeds them safely.

`base` (the Logger protocol, LoggerContext), `failures` (a failed delivery: permanent, outage or
transient), `registry` (built-ins and the `tracker_eval.loggers` entry-point group, option
checking), `worker` (one logger's ordered calls with deadlines), `fanout` (one result to many
loggers, isolating failures), `session` (the configured loggers of a stream), and the built-in
`console` and `jsonl` loggers. Tracker plug-ins (W&B, MLflow) live under `integrations/` and import
`loggers.base` and `loggers.failures`.

May import: the shared top level and evaluation (EvalResult, activity).
Public names: Logger, LoggerContext, FanOut, LoggerError, LoggerSession, ConsoleLogger, JsonlLogger,
PermanentDeliveryError, TrackerUnavailableError.
"""

from tracker_eval.imports import lazy_exports

_EXPORTS = {
    "Logger": "base",
    "LoggerContext": "base",
    "FanOut": "fanout",
    "LoggerError": "worker",
    "LoggerSession": "session",
    "ConsoleLogger": "console",
    "JsonlLogger": "jsonl",
    "PermanentDeliveryError": "failures",
    "TrackerUnavailableError": "failures",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""The demo behind `tracker-eval demo`: a training process, a watcher beside it, a table and a plot.

`run` (the command), `train` (the training process it starts), `plot` (metrics per checkpoint),
`harness` (`--harness`: the byte LM scored per checkpoint by the LM Evaluation Harness suite),
`beside` (what both share: loggers, training beside a watcher, browsing). Imports run one way:
run -> harness -> beside.

May import: anything (it is an application on top of every stage).
Public names: run_demo.
"""

from tracker_eval.imports import lazy_exports

_EXPORTS = {
    "run_demo": "run",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

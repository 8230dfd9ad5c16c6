"""Built-in tasks: tiny models with ready eval functions and data on small real datasets.

Written as user code is: they import the public `tracker_eval.metrics` and nothing else of
tracker-eval. `train` is a real training loop that writes Orbax checkpoints (demo, tests).

May import: the shared top level and evaluation (through `tracker_eval.metrics`).

    model: tracker_eval.tasks.classification:make_model
    eval_function: tracker_eval.tasks.classification:eval_function
    data: tracker_eval.tasks.classification:make_eval_data
"""

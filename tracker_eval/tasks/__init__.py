"""Built-in tasks: tiny models with ready eval functions and data on small real datasets.

    model: tracker_eval.tasks.classification:make_model
    eval_function: tracker_eval.tasks.classification:eval_function
    data: tracker_eval.tasks.classification:make_eval_data
"""

"""The metric kinds an eval function returns: the public home of `Mean`, `Sum`, `Max`, `Min`, `PerExample`.

    from tracker_eval.metrics import Mean, PerExample

    def eval_function(params, apply_fn, batch, rng):
        loss = ...
        return {"loss": Mean(loss), "example_loss": PerExample(loss)}, None

How they are accumulated and finalized lives in `tracker_eval.evaluation.metrics`.
"""

from tracker_eval.evaluation.metrics import Max, Mean, Metric, Min, PerExample, Sum

__all__ = ["Max", "Mean", "Metric", "Min", "PerExample", "Sum"]

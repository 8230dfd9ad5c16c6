"""tracker-eval: evaluate JAX/Flax Orbax checkpoints as they appear and log results to trackers.

Importing this package stays light: no tracker library (wandb, mlflow) is imported here.
"""

__version__ = "0.1.0"

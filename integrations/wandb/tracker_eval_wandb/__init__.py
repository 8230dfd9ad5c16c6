"""wandb logger plug-in for tracker-eval."""

"""mlflow logger plug-in for tracker-eval."""

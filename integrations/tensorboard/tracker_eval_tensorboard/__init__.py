"""TensorBoard logger plug-in for tracker-eval: event files written without TensorFlow."""

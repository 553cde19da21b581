"""Training: curriculum, loss, engine, checkpoints, metrics, evaluation."""

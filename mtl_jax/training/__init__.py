"""TrainState, the pure train/eval steps, the loop, checkpoints and metric writers."""

"""Training: the run config, the model set-up, the loop, step options, the feature cache and DDP."""

"""Training: the model, the recipe, feeding the shards, callbacks, checkpoints and the run fingerprint."""

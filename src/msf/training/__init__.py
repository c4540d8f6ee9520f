"""Training: the loop and its state, checkpoints, the data behind it, latent caches, torchrun, REPA."""

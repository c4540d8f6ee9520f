"""The method: the factorization (Algorithms 1-3), rectified flow, the solvers, the per-scale DiT,
the pipeline, the autoencoder."""

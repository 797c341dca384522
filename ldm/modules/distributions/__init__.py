"""Latent posteriors of the first stage (`DiagonalGaussianDistribution`)."""

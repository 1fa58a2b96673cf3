"""cogvae.converter: diffusers -> Flax NNX conversion engine."""

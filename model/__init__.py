"""cogvae.model: Flax NNX reimplementation of diffusers AutoencoderKLCogVideoX."""

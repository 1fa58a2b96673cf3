"""cogvae.mappings: declarative diffusers -> NNX mapping tables (YAML package data)."""

"""cogvae.converter: diffusers CogVideoX VAE <-> Flax NNX conversion.

``load(path)`` returns the bundled NNX model with weights loaded from a diffusers VAE folder
(or a pipeline folder holding ``vae/``).
"""

from .engine import ConversionError, convert_tensors, export_tensors
from .loading import SourceError, find_diffusers_vae, load, model_from_tensors
from .mapping import MappingError, load_mapping

__all__ = [
    "ConversionError",
    "MappingError",
    "SourceError",
    "convert_tensors",
    "export_tensors",
    "find_diffusers_vae",
    "load",
    "load_mapping",
    "model_from_tensors",
]

"""cogvae.converter: diffusers CogVideoX VAE <-> Flax NNX conversion.

``load(path)`` returns the bundled NNX model with weights loaded from a diffusers VAE folder
(or a pipeline folder holding ``vae/``), or from a converted cogvae checkpoint folder.
``save(vae, out)`` writes a model held in memory (a JAX fine-tune) as such a folder, and
``export_diffusers(vae_or_folder, out)`` as a diffusers VAE folder.

The names below are imported on first use, so that the command line starts (``--help``, usage
errors) without importing jax and flax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConversionError": ".engine",
    "convert_tensors": ".engine",
    "export_tensors": ".engine",
    "SourceError": ".loading",
    "find_diffusers_vae": ".loading",
    "load": ".loading",
    "model_from_tensors": ".loading",
    "MappingError": ".mapping",
    "load_mapping": ".mapping",
    "export_diffusers": ".saving",
    "model_params": ".saving",
    "save": ".saving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

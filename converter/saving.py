"""Save a model held in memory (a JAX fine-tune, say) as a cogvae checkpoint or a diffusers folder.

``save(vae, "ckpt-ft/")`` writes the same folder ``cogvae-convert`` writes (``orbax/``,
``params.msgpack``, ``config.json``, ``provenance.json`` and the ``COMPLETE`` manifest), atomically
and validated by default; ``load``, ``verify``, ``export-diffusers`` and ``push`` take it as they
take a converted one. ``export_diffusers(vae, "vae-diffusers/")`` writes diffusers'
``config.json`` and ``diffusion_pytorch_model.safetensors`` straight from the model, through the
inverse of the mapping table, for ``AutoencoderKLCogVideoX.from_pretrained``.

Both refuse a model whose parameters do not match its config's architecture, or hold a dtype
cogvae does not store or a non-finite value (a diverged fine-tune), naming every offending tensor
in one error, and leave nothing at ``out`` when they fail.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .checkpoint import (
    CONFIG_NAME,
    FORMATS,
    PROVENANCE_NAME,
    OutputError,
    atomic_output_dir,
    finish_into,
    is_converted_checkpoint,
    keep_heap_lean,
    normalize_formats,
    read_checkpoint,
    write_into,
)
from .engine import ConversionError, abstract_targets, cast_checked, path_to_str, value_problem
from .layout import DIFFUSERS_WEIGHTS
from .mapping import Mapping, load_mapping

__all__ = ["model_params", "save", "export_diffusers"]

IN_MEMORY = "<in-memory model>"


def _model_class():
    from cogvae.model import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX


def model_params(vae, *, dtype: Any = None, source_name: str = IN_MEMORY) -> dict[str, np.ndarray]:
    """``{dotted NNX path: host array}`` of ``vae``'s parameters, checked against its config.

    Every path and shape must be what ``abstract_model(vae.config)`` has (nothing missing, nothing
    extra: a parameter added for training, e.g. an adapter, must be merged or removed first); every
    dtype must be one cogvae stores; every value finite. All problems are raised together, in one
    :class:`ConversionError`. ``dtype``: cast the parameters ('float32', 'bfloat16', 'float16').
    """
    from flax import nnx

    from cogvae.model import abstract_model

    from .loading import resolve_dtype

    if not isinstance(vae, _model_class()):
        raise TypeError(f"expected a cogvae AutoencoderKLCogVideoX, got {type(vae).__name__}")
    cast = None if dtype is None else np.dtype(resolve_dtype(dtype))
    targets = abstract_targets(nnx.split(abstract_model(vae.config))[1])
    problems: list[str] = []
    params: dict[str, np.ndarray] = {}
    for path, leaf in nnx.to_flat_state(nnx.state(vae)):
        key = path_to_str(path)
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        target = targets.pop(key, None)
        if target is None:
            problems.append(f"{source_name}: parameter {key!r} {tuple(value.shape)}: not part of the "
                            f"CogVideoX VAE architecture of its config (extra)")
            continue
        arr = np.asarray(value)  # device -> host, one tensor at a time
        if tuple(arr.shape) != target.shape:
            problems.append(f"{source_name}: parameter {key!r}: shape {tuple(arr.shape)}, the config's "
                            f"architecture has {target.shape}")
            continue
        problem = value_problem(arr)
        if not problem and cast is not None and arr.dtype != cast:
            arr, problem = cast_checked(arr, cast)  # a finite value can overflow the narrower dtype
        if problem:
            problems.append(f"{source_name}: parameter {key!r}: {problem}")
            continue
        params[key] = np.ascontiguousarray(arr)
    problems += [f"{source_name}: parameter {k!r} {t.shape}: missing" for k, t in targets.items()]
    if problems:
        raise ConversionError(problems, header=f"cannot save {source_name}")
    return params


def _base_source(base: Optional[str | os.PathLike]) -> Optional[dict]:
    """What ``base`` (the checkpoint or model a fine-tune started from) says of its origin."""
    if base is None:
        return None
    if is_converted_checkpoint(base):
        prov = json.loads((Path(base) / PROVENANCE_NAME).read_text())
        src = prov.get("source") if isinstance(prov.get("source"), dict) else {}
        return {"id": src.get("id"), "revision": src.get("revision"), "is_hub": src.get("is_hub"),
                "checkpoint": str(base)}
    from .hub import looks_like_repo_id

    base = str(base)
    return {"id": base, "revision": None, "is_hub": looks_like_repo_id(base) and not Path(base).exists()}


def save(
    vae,
    out: str | os.PathLike,
    *,
    base: Optional[str | os.PathLike] = None,
    dtype: Any = None,
    formats: Iterable[str] | str = FORMATS,
    validate: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``vae`` as a cogvae checkpoint folder at ``out``; returns a summary dict.

    ``base``: where the model came from (the converted checkpoint it was loaded from, or a Hub id
    such as ``THUDM/CogVideoX-2b``), recorded in ``provenance.json``; ``cogvae push`` then names it
    as the card's ``base_model`` and keeps its licence. ``dtype``: cast the stored parameters
    (default: keep the model's). ``formats``, ``validate`` and ``overwrite`` as for
    ``cogvae-convert``: each written format is loaded back and must give the saved parameters
    bit for bit and decode a small latent to finite values.
    """
    from .convert import ValidationError, _digests, _versions, validate_checkpoint_dir

    keep_heap_lean()
    formats = normalize_formats(formats)
    out = Path(out)
    mapping = load_mapping()
    origin = _base_source(base)  # before any work: an unreadable base fails at once
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        params = model_params(vae, dtype=dtype)
        config = vae.config
        stored = sorted({a.dtype.name for a in params.values()})
        nbytes = sum(a.nbytes for a in params.values())
        count = len(params)
        expected = _digests(params) if validate else None
        try:
            known = write_into(tmp, params, config, formats=formats)
        except OSError as e:
            raise OutputError(f"{out}: cannot write checkpoint: {e.strerror or e}") from None
        del params
        validation = validate_checkpoint_dir(tmp, config, formats, expected) if validate else {"skipped": True}
        if validate and not validation["ok"]:
            raise ValidationError(f"{out}: validation failed: " + "; ".join(validation["problems"]), validation)
        provenance = {
            "source": {"id": IN_MEMORY, "revision": None, "is_hub": False, **(origin or {}), "saved_from": IN_MEMORY},
            "base": origin,
            "mapping": {"path": str(mapping.path), "sha256": mapping.sha256},
            "versions": _versions(),
            "dtype": {"requested": None if dtype is None else stored[0], "stored": stored},
            "formats": list(formats),
            "num_parameters_bytes": nbytes,
            "validation": validation,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest = finish_into(tmp, formats, provenance, known)
    return {"ok": True, "out": str(out), "formats": list(formats), "dtype": stored, "num_tensors": count,
            "bytes": nbytes, "files": {k: v["size"] for k, v in manifest["files"].items()}, "validation": validation,
            "base": origin}


def export_diffusers(
    source,
    out: str | os.PathLike,
    *,
    format: Optional[str] = None,
    overwrite: bool = False,
    mapping: Optional[Mapping] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
) -> dict[str, Any]:
    """Write a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
    atomically, through the inverse of the mapping table.

    ``source``: a cogvae model in memory, a converted checkpoint folder, or the Hub repo id of one
    (pushed by ``cogvae push``; ``revision``, ``token``, ``cache_dir`` as for ``load``). ``format``
    picks 'orbax' or 'msgpack' (default Orbax when present; from the Hub, one already cached). The tensors are bit-identical to the ones
    converted (a round trip diffusers -> cogvae -> diffusers gives diffusers' bytes back), and
    diffusers' ``AutoencoderKLCogVideoX.from_pretrained`` loads the folder.
    """
    from .engine import export_tensors
    from .st_io import save_safetensors

    keep_heap_lean()
    mapping = mapping or load_mapping()
    if isinstance(source, _model_class()):
        if format is not None or revision is not None:
            raise ValueError("format= and revision= apply to a checkpoint, not to a model in memory")
        config, params, name, fmt = source.config, model_params(source), IN_MEMORY, None
    else:
        from .loading import fetch

        hub = fetch(source, kind="checkpoint", format=format, revision=revision, token=token, cache_dir=cache_dir)
        folder = hub.folder if hub is not None else source
        config, params, info = read_checkpoint(folder, format=hub.format if hub is not None else format)
        name, fmt = f"{source} ({info['format']})", info["format"]
    # lazy: every check passes first, then each tensor is transformed as the writer reaches it and
    # its source array is released, so memory stays near one copy of the weights.
    tensors = export_tensors(params, mapping, source_name=name, lazy=True)
    del params
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(config.to_diffusers_config(), indent=2) + "\n")
            save_safetensors(tensors, tmp / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{out}: cannot write: {e.strerror or e}") from None
    return {"ok": True, "out": str(out), "checkpoint": str(source) if fmt else IN_MEMORY, "format": fmt,
            "num_tensors": len(tensors), "files": [CONFIG_NAME, DIFFUSERS_WEIGHTS]}

"""Load a CogVideoX VAE into the bundled NNX model from diffusers files.

``load(path)`` accepts a diffusers VAE folder (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or a sharded ``.safetensors.index.json``), or a pipeline
folder holding ``vae/``. The model is built abstractly (``nnx.eval_shape``), its state is filled
by the mapping engine with every check applied, and only then merged: nothing is half-loaded.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping as TMapping, Optional

import jax.numpy as jnp
from flax import nnx

from cogvae.model import AutoencoderKLCogVideoX, ConfigError, VAEConfig, abstract_model

from .engine import convert_tensors
from .hub import (  # SourceError lives with the source resolver (no jax there)
    SourceError,
    check_read_variant,
    UnreadableError,
    input_exists,
    local_path,
    DIFFUSERS_FOLDER,
    EITHER_FOLDER,
    not_a_folder,
    strip_subfolder,
    unreadable,
)
from .layout import WEIGHTS_NAME, variants_in, weights_in, weights_names
from .mapping import Mapping, load_mapping
from .st_io import is_index_file, open_safetensors

__all__ = ["SourceError", "UnreadableError", "DiffusersSource", "fetch", "find_diffusers_vae", "model_from_tensors", "load_diffusers", "resolve_dtype"]


def resolve_dtype(dtype: Any, name: str = "dtype") -> Any:
    """None, or a supported dtype (float32, bfloat16, float16; a name or a dtype) as its jnp
    scalar type; anything else raises (see :func:`cogvae.model.resolve_dtype`)."""
    from cogvae.model import resolve_dtype as resolve

    return resolve(dtype, name)


@dataclass(frozen=True)
class DiffusersSource:
    """The files of one diffusers VAE: its folder, config and weights (single file or index)."""

    folder: Path
    config_path: Path
    weights_path: Path

    @property
    def weight_files(self) -> list[Path]:
        """The weights file, or the index and every shard it names (a bad index raises SafetensorsError)."""
        if is_index_file(self.weights_path):
            from .st_io import read_index

            return [self.weights_path] + sorted(set(read_index(self.weights_path).values()))
        return [self.weights_path]


def find_diffusers_vae(path: str | Path, *, subfolder: str = "vae", variant: Optional[str] = None) -> DiffusersSource:
    """Locate config and weights in a VAE folder or a pipeline folder with ``<subfolder>/``
    (``~`` expanded). A folder that cannot be looked into raises :class:`UnreadableError`."""
    check_read_variant(variant)
    root = local_path(path)
    subfolder = strip_subfolder(subfolder)  # '/vae', 'vae/' name the folder 'vae', as for a Hub repo
    if not input_exists(root):
        raise SourceError(f"{root}: no such file or folder")
    if not root.is_dir():
        raise SourceError(not_a_folder(root, DIFFUSERS_FOLDER))
    try:
        return _find_in(root, subfolder, variant)
    except OSError as e:
        if isinstance(e, SourceError):
            raise
        # only stats happen here: permission denied means the folder holding the file cannot be searched
        where = root if e.filename is None else Path(e.filename).parent if e.errno == errno.EACCES else e.filename
        raise unreadable(where, e) from None


def _not_a_file(path: Path) -> Optional[str]:
    """Why ``path``, which is there by name, is not a file to read: a broken symlink (a Hub cache
    whose blob was deleted looks like this), a folder, or another kind of file that is not a
    regular one (a FIFO, ...); None when it is a regular file or not there at all."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symlink (to {os.readlink(path)}, which does not exist)"
    if path.is_dir():
        return f"{path} is a folder, not a file"
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode):  # a FIFO, socket or device: reading it would block or give no weights
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        return f"{path} is {kind}, not a regular file"
    return None


def _find_in(root: Path, subfolder: str, variant: Optional[str]) -> DiffusersSource:
    candidates = [root] + ([root / subfolder] if subfolder else [])
    for folder in candidates:
        why = _not_a_file(folder / "config.json")
        if why:
            raise SourceError(f"{why}: cannot read the VAE config")
        if (folder / "config.json").is_file():
            weights = weights_in(folder, variant)
            if weights is None:
                broken = [w for w in (_not_a_file(folder / n) for n in weights_names(variant)) if w]
                if broken:  # not "no such file" for one that is there: say what is wrong with it
                    raise SourceError(f"{'; '.join(broken)}: cannot read the VAE weights")
                found = sorted(p.name for p in folder.glob(f"{WEIGHTS_NAME}*"))
                hint = f" (found: {', '.join(found)})" if found else ""
                want = WEIGHTS_NAME + (f".{variant}" if variant else "") + ".safetensors[.index.json]"
                others = variants_in(folder)
                if others:  # safetensors weights of another variant, as diffusers' from_pretrained refuses them
                    tip = "; ".join(f"variant={v!r} (--variant {v})" if v else "the weights without a variant "
                                    "(leave out variant / --variant)" for v in others)
                    raise SourceError(f"{folder}: no {want}{hint}; it has {tip}")
                raise SourceError(f"{folder}: no {want}{hint}; only safetensors weights are supported")
            return DiffusersSource(folder, folder / "config.json", weights)
    if (root / "model_index.json").is_file():
        from .hub import pipeline_vaes

        named = [n for n in pipeline_vaes(root) if (root / n / "config.json").is_file()]
        hint = f" (its model_index.json names the VAE {named[0]!r}: pass --subfolder {named[0]})" if named else ""
        raise SourceError(f"{root}: a pipeline folder without a '{subfolder}/' VAE subfolder{hint}")
    raise SourceError(f"{root}: no config.json (nor {subfolder}/config.json): not a diffusers VAE folder")


def model_from_tensors(
    config: VAEConfig,
    tensors: TMapping[str, Any],
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    mapping: Optional[Mapping] = None,
    source_name: str = "<tensors>",
) -> AutoencoderKLCogVideoX:
    """Build the NNX VAE from diffusers-named tensors (numpy arrays, read lazily one at a time).

    The model is created with ``nnx.eval_shape`` (no random init), its abstract state is filled by
    the strict mapping engine, and merged. ``dtype`` casts the parameters (default: keep the
    source dtype); ``compute_dtype`` defaults to bf16 on accelerators and fp32 on CPU.
    """
    mapping = mapping or load_mapping()
    abstract = abstract_model(config, dtype=resolve_dtype(compute_dtype, "compute_dtype"))
    graphdef, abstract_state = nnx.split(abstract)
    state = convert_tensors(tensors, abstract_state, mapping, dtype=resolve_dtype(dtype), source_name=source_name)
    return nnx.merge(graphdef, state)


def load_diffusers(
    path: str | Path,
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    subfolder: str = "vae",
    variant: Optional[str] = None,
    mapping: Optional[Mapping] = None,
) -> AutoencoderKLCogVideoX:
    from .engine import with_config_problems

    src = find_diffusers_vae(path, subfolder=subfolder, variant=variant)
    # an unknown config key is reported together with the weights' problems (one error)
    config, config_error = VAEConfig.from_json_file_ignoring_unknown(src.config_path)
    tensors = open_safetensors(src.weights_path, strict=False)  # file problems join the tensors' (one error)
    with with_config_problems(config_error, src.config_path):
        return model_from_tensors(config, tensors, dtype=dtype, compute_dtype=compute_dtype, mapping=mapping,
                                  source_name=str(src.weights_path))


def load_checkpoint(
    path: str | Path, *, dtype: Any = None, compute_dtype: Any = None, format: Optional[str] = None, verify: bool = True
) -> AutoencoderKLCogVideoX:
    """Load a converted cogvae checkpoint folder (see ``cogvae.converter.checkpoint``)."""
    from .checkpoint import lean_heap_while_loading, params_to_model, read_checkpoint

    with lean_heap_while_loading():  # resident memory near one copy of the weights (see there)
        config, params, info = read_checkpoint(path, format=format, verify=verify, as_jax=True)
        return params_to_model(config, params, dtype=dtype, compute_dtype=compute_dtype,
                               source_name=f"{path} ({info['format']})", adopt=True)


def fetch(source: str | Path, *, kind: Optional[str] = None, **kwargs: Any):
    """``None`` for a local path (it is used as is, no Hub request), else the Hub repo id
    ``source`` resolved into the Hub cache: a :class:`cogvae.converter.hub.ResolvedSource` (its
    ``folder``, ``kind`` and ``format``). ``kwargs`` go to ``hub.resolve_source`` (``revision``,
    ``subfolder``, ``variant``, ``format``, ``token``, ``cache_dir``, ``quiet``); a ``revision``
    makes ``source`` a repo id. ``kind``: 'checkpoint' or 'diffusers', required of a Hub repo: one of
    the other kind is refused (``hub.WrongKindError``, a :class:`SourceError`) after the first,
    small request, before any weights are fetched. Hub failures raise ``hub.HubError``.
    """
    from .hub import looks_like_repo_id, resolve_source

    text = str(source)
    if kwargs.get("revision") is None and (input_exists(local_path(text)) or not looks_like_repo_id(text)):
        return None
    return resolve_source(text, kind=kind, **kwargs)


def _diffusers_only(subfolder: Optional[str], variant: Optional[str], mapping: Optional[Mapping]) -> list[str]:
    """The keywords given to ``load`` that apply to diffusers weights only, not to a converted
    checkpoint (the default ``subfolder``, or the root, is no such choice)."""
    given = [f"{k}=" for k, v in (("variant", variant), ("mapping", mapping)) if v is not None]
    if subfolder is not None and strip_subfolder(subfolder) not in ("", "vae"):
        given.insert(0, "subfolder=")
    return given


def not_for_checkpoint(where: Any, given: list[str], why: str = "a checkpoint holds one set of parameters") -> str:
    """What to say when options choosing diffusers weights (``given``: their names) are given for a
    converted checkpoint: refused everywhere (load, verify, inspect), never silently ignored."""
    verb = "applies" if len(given) == 1 else "apply"
    return f"{where}: a converted cogvae checkpoint: {', '.join(given)} {verb} to diffusers weights only ({why})"


def _not_for_checkpoint(where: Any, given: list[str]) -> ValueError:
    return ValueError(not_for_checkpoint(where, given, "a checkpoint holds one set of parameters; dtype= casts them"))


def load(
    path: str | Path,
    dtype: Any = None,
    *,
    compute_dtype: Any = None,
    format: Optional[str] = None,
    verify: bool = True,
    subfolder: str = "vae",
    variant: Optional[str] = None,
    mapping: Optional[Mapping] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    cache_dir: Optional[str | Path] = None,
) -> AutoencoderKLCogVideoX:
    """Load a CogVideoX VAE as the bundled NNX model.

    ``path``: a converted cogvae checkpoint folder (from ``cogvae-convert`` or ``save``), a
    diffusers VAE folder, a pipeline folder with ``vae/``, or a Hugging Face Hub repo id of any of
    these (a checkpoint pushed by ``cogvae push``, or a diffusers repo such as
    ``THUDM/CogVideoX-2b``, whose VAE is converted in memory). A local folder of that name wins.
    ``dtype``: parameter dtype ('float32', 'bfloat16', 'float16' or a jnp dtype); None keeps the
    stored dtype. Other keywords: ``compute_dtype``; for a converted checkpoint ``format``
    ('orbax' default, 'msgpack') and ``verify`` (check sha256 against the manifest, default True);
    for diffusers files ``subfolder``, ``variant``, ``mapping``; for a Hub repo ``revision``
    (branch, tag or commit), ``token`` and ``cache_dir``. From the Hub only the files needed are
    fetched: the VAE's of a pipeline repo, one format of a checkpoint (``format``, else one already
    cached, else Orbax). The model is built abstractly (``nnx.eval_shape``), filled and merged:
    never randomly initialised. ``~`` in a local path is expanded; a local path that cannot be
    read (permission denied, a name too long) raises ``hub.UnreadableError``, a :class:`SourceError`.
    An option for the other kind of source, set to anything but its default, is refused (never
    silently ignored).
    """
    from .checkpoint import looks_like_checkpoint
    from .hub import WrongKindError

    if mapping is not None and not isinstance(mapping, Mapping):
        raise TypeError(f"load(mapping=...): a cogvae.converter.mapping.Mapping (load_mapping(path)), not "
                        f"{type(mapping).__name__}")
    if not isinstance(verify, bool):
        raise TypeError(f"load(verify=...): True or False, not {verify!r}")
    # variant= (or mapping=, a subfolder) asks for diffusers weights: a checkpoint repo is refused
    # after the first, small request, before its parameters are fetched
    diffusers_only = _diffusers_only(subfolder, variant, mapping)
    try:
        hub = fetch(path, kind="diffusers" if diffusers_only else None, subfolder=subfolder,
                    revision=revision, variant=variant, format=format, cache_dir=cache_dir, token=token)
    except WrongKindError as e:
        if e.found == "checkpoint":
            raise _not_for_checkpoint(e.where, diffusers_only) from None
        raise
    if hub is not None:
        path = hub.folder
        if hub.kind == "checkpoint":
            format = hub.format
    else:
        path = local_path(path)
        refuse_a_file(path, diffusers_only)
    is_checkpoint = hub.kind == "checkpoint" if hub is not None else looks_like_checkpoint(path)
    if is_checkpoint:
        if diffusers_only:
            raise _not_for_checkpoint(path, diffusers_only)
        return _fits_compute_dtype(load_checkpoint(path, dtype=dtype, compute_dtype=compute_dtype, format=format,
                                                   verify=verify))
    given = [name for name, value, default in (("format=", format, None), ("verify=", verify, True))
             if value != default]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise SourceError(f"{path}: not a converted cogvae checkpoint ({', '.join(given)} {verb} to those only)")
    return _fits_compute_dtype(load_diffusers(path, dtype=dtype, compute_dtype=compute_dtype, subfolder=subfolder,
                                              variant=variant, mapping=mapping))


def refuse_a_file(path: Path, diffusers_only: bool = False) -> None:
    """A local input that takes either kind of source (``load``, ``inspect``) and is a file: the
    error names both kinds (or only diffusers' folder, when an option asks for diffusers weights),
    and the folder when the file is one of a model folder. A missing path is left to the reader."""
    if input_exists(path) and not path.is_dir():
        raise SourceError(not_a_folder(path, DIFFUSERS_FOLDER if diffusers_only else EITHER_FOLDER))


def _fits_compute_dtype(vae):
    """``vae``, once its weights are known to fit a float16 compute dtype: every kernel casts them
    to it, so a finite float32 weight beyond 65504 would be Inf there and every output NaN (the
    same check as ``vae.to(compute_dtype=float16)``). Only float16 is checked here: bfloat16's
    range ends within 0.4% of float32's, and a bfloat16 compute dtype is the default on every
    accelerator load, where this check would cost a compile; ``vae.to`` checks both)."""
    from cogvae.model.vae import _refuse_overflow

    if vae.dtype is jnp.float16:
        _refuse_overflow(nnx.state(vae, nnx.Param), jnp.float16)
    return vae


__all__ += ["load", "load_checkpoint", "ConfigError"]

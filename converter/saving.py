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
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .checkpoint import (
    CONFIG_NAME,
    FORMATS,
    PROVENANCE_NAME,
    OutputError,
    atomic_output_dir,
    check_not_inside,
    finish_into,
    keep_heap_lean,
    normalize_formats,
    read_checkpoint,
    write_into,
)
from .engine import ConversionError, architecture_problems, cast_checked, expected_shapes, path_to_str, value_problem
from .layout import VARIANT_NAME, VARIANT_RULE, read_json, single_weights_name
from .mapping import Mapping, load_mapping, provenance_entry

__all__ = ["model_params", "save", "export_diffusers"]

IN_MEMORY = "<in-memory model>"


def _model_class():
    from cogvae.model import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX


def model_params(vae, *, dtype: Any = None, source_name: str = IN_MEMORY, action: str = "save") -> dict[str, np.ndarray]:
    """``{dotted NNX path: host array}`` of ``vae``'s parameters, checked against its config.

    Every path and shape must be what ``abstract_model(vae.config)`` has (nothing missing, nothing
    extra: a parameter added for training, e.g. an adapter, must be merged or removed first); every
    dtype must be one cogvae stores; every value finite. All problems are raised together, in one
    :class:`ConversionError` ("cannot ``action`` ..."). ``dtype``: cast the parameters ('float32',
    'bfloat16', 'float16').
    """
    from flax import nnx

    from .loading import resolve_dtype

    if not isinstance(vae, _model_class()):
        raise TypeError(f"expected a cogvae AutoencoderKLCogVideoX, got {type(vae).__name__}")
    cast = None if dtype is None else np.dtype(resolve_dtype(dtype))
    leaves = {path_to_str(path): leaf.get_value() if hasattr(leaf, "get_value") else leaf
              for path, leaf in nnx.to_flat_state(nnx.state(vae))}
    expected = expected_shapes(vae.config)
    problems = architecture_problems({k: tuple(v.shape) for k, v in leaves.items()}, expected, source_name)
    params: dict[str, np.ndarray] = {}
    for key, value in leaves.items():
        if tuple(value.shape) != expected.get(key):
            continue  # extra or misshapen: named above
        arr = np.asarray(value)  # device -> host, one tensor at a time
        problem = value_problem(arr)
        if not problem and cast is not None and arr.dtype != cast:
            arr, problem = cast_checked(arr, cast)  # a finite value can overflow the narrower dtype
        if problem:
            problems.append(f"{source_name}: parameter {key!r}: {problem}")
            continue
        params[key] = np.ascontiguousarray(arr)
    if problems:
        raise ConversionError(problems, header=f"cannot {action} {source_name}")
    return params


def _check_base_config(config_path: Path, config: Any, where: str) -> None:
    """The base's config.json must describe the model's network, setting for setting (as ``cogvae
    verify --reference`` compares them; the writer's diffusers version is no setting): a base of
    another network would be recorded, and the card's verify command against it would fail."""
    from cogvae.model import ConfigError, VAEConfig

    from .loading import SourceError

    try:
        theirs, _ = VAEConfig.from_json_file_ignoring_unknown(config_path)
    except ConfigError as e:
        raise SourceError(f"base {where}: {e}") from None
    differ = sorted(config.differences(theirs))
    if differ:
        shown = "; ".join(f"{k}: {config[k]!r} in the model, {theirs[k]!r} in the base" for k in differ)
        raise SourceError(f"base {where}: not the network of the model being saved ({len(differ)} setting(s) "
                          f"differ: {shown}); pass the base it was fine-tuned from, or no base")


def _base_source(base: Optional[str | os.PathLike], revision: Optional[str] = None, token: Any = None,
                 config: Any = None) -> Optional[dict]:
    """What ``base`` (the checkpoint or model a fine-tune started from) is, and where its weights
    came from: the ``base`` record of the fine-tune's provenance.json; None for no base.

    ``{"id": base as given, "revision": its Hub commit (None for a local folder), "is_hub",
    "kind": "checkpoint" | "diffusers", "source": what the base's own model card names as its
    base (a checkpoint's provenance.json), "origin": the Hub repo or folder its weights were first
    converted from (whose licence they keep)}``; a local checkpoint also has ``"checkpoint"``.

    Checked before any work, so a wrong ``base`` costs nothing: a local path must exist and be a
    complete converted checkpoint or a diffusers VAE or pipeline folder. Anything else that looks
    like a Hub repo id (``org/name``) is looked up on the Hub through the Hub cache, reading only
    its small files (``COMPLETE``, ``config.json``, ``provenance.json``, ``model_index.json``,
    ``vae/config.json``; never weights) at ``revision`` (a branch, tag or commit; default its main
    branch), whose commit is recorded (``token`` for a private or gated repo); a checkpoint
    repo's provenance.json gives its origin. Errors (:class:`~cogvae.converter.hub.HubError`,
    :class:`~cogvae.converter.checkpoint.CheckpointError`,
    :class:`~cogvae.converter.loading.SourceError`) name ``base`` and what was wrong: a path that
    is neither a local folder nor a repo on the Hub; a repo that is neither a checkpoint nor a
    diffusers model; and, when the Hub cannot be reached (no network, ``HF_HUB_OFFLINE=1``) and
    the repo is not in the Hub cache, that (a base that cannot be checked is not recorded
    unchecked: pass the local checkpoint folder the model was loaded from, or no base). With
    ``config`` (the model's), a base whose config.json has other settings is refused
    (:class:`~cogvae.converter.loading.SourceError` listing each; see :func:`_check_base_config`).
    """
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"base_revision must be a non-empty branch, tag or commit, got {revision!r}")
    if base is None:
        if revision is not None:
            raise ValueError("base_revision names a revision of a Hub base: pass base= too")
        return None
    from .checkpoint import CheckpointError, check_files, looks_like_checkpoint
    from .hub import EITHER_FOLDER, HubError, _looks_local, input_exists, local_path, looks_like_repo_id, not_a_folder
    from .layout import MANIFEST_NAME
    from .loading import SourceError, find_diffusers_vae
    from .push import provenance_origin

    text = os.fspath(base)
    path = local_path(text)
    # a local conversion's subfolder and variant too: the card of a fine-tune of it compares with
    # the base's weights the conversion read
    keep = ("id", "revision", "is_hub", "subfolder", "variant")

    def origin_of(prov_path: Path, where: str) -> tuple[dict, dict]:
        """(what the checkpoint's card names as its base, its root source) from its provenance.json."""
        try:
            prov = read_json(prov_path)
            if not isinstance(prov, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"base {where}: cannot read its {PROVENANCE_NAME}: {e}") from None
        o = provenance_origin(prov)
        return {k: o[k] for k in keep}, o["root"]

    exists = input_exists(path)
    if exists and revision is not None:
        raise ValueError(f"base_revision={revision!r} is for a Hub repo id, but base {text} is a local folder "
                         "(a local folder has no revisions)")
    if exists:
        if not path.is_dir():
            raise SourceError("base " + not_a_folder(text, EITHER_FOLDER))
        if looks_like_checkpoint(path):
            try:
                check_files(path, hashes=False)  # a valid manifest, every file it lists there with its size
            except CheckpointError as e:
                raise CheckpointError(f"base {text}: not a complete converted checkpoint: {e}") from None
            if config is not None:
                _check_base_config(path / CONFIG_NAME, config, text)
            source, root = origin_of(path / PROVENANCE_NAME, text)
            return {"id": text, "revision": None, "is_hub": False, "kind": "checkpoint", "checkpoint": text,
                    "source": source, "origin": root}
        try:
            found = find_diffusers_vae(path)
        except SourceError as e:
            raise SourceError(f"base {text}: neither a converted cogvae checkpoint nor a diffusers VAE: {e}") from None
        if config is not None:
            _check_base_config(found.config_path, config, text)
        return {"id": text, "revision": None, "is_hub": False, "kind": "diffusers",
                "origin": {"id": text, "revision": None, "is_hub": False}}
    if _looks_local(text) or not looks_like_repo_id(text):
        raise HubError(f"base {text}: no such folder" + ("" if _looks_local(text) else
                                                        " (and not a Hub repo id 'org/name')"))

    from huggingface_hub import constants

    from .hub import _COMMIT, _download, pipeline_vaes

    small = [MANIFEST_NAME, CONFIG_NAME, PROVENANCE_NAME, "model_index.json", f"vae/{CONFIG_NAME}"]
    try:
        snap = _download(text, revision, small, constants.HF_HUB_CACHE, token, True)
    except HubError as e:
        msg = str(e)
        if "no such local folder" not in msg:  # the Hub (or its cache) could not answer
            msg = f"{text}: no such local folder, so it was looked up on the Hugging Face Hub: {msg}"
        raise HubError(f"base {msg}; to record it without the Hub, pass base= the local checkpoint folder "
                       "the model was loaded from (or no base)") from e
    commit = snap.name if _COMMIT.match(snap.name) else None
    where = f"{text}@{commit or revision or 'main'}"
    if (snap / MANIFEST_NAME).is_file():
        if not (snap / PROVENANCE_NAME).is_file():
            raise HubError(f"base {where}: a cogvae checkpoint repo without {PROVENANCE_NAME} in the snapshot at "
                           f"{snap} (a cache the Hub could not complete, or an incomplete repo)")
        if config is not None:
            _check_base_config(snap / CONFIG_NAME, config, where)
        source, root = origin_of(snap / PROVENANCE_NAME, where)
        return {"id": text, "revision": commit, "is_hub": True, "kind": "checkpoint", "source": source,
                "origin": root}
    if (snap / "vae" / CONFIG_NAME).is_file() or (snap / CONFIG_NAME).is_file() or pipeline_vaes(snap):
        # the VAE's config where the small download has it (a pipeline's VAE under another
        # folder name, found through model_index.json, was not fetched: nothing to compare)
        vae_config = next((c for c in (snap / "vae" / CONFIG_NAME, snap / CONFIG_NAME) if c.is_file()), None)
        if config is not None and vae_config is not None:
            _check_base_config(vae_config, config, where)
        return {"id": text, "revision": commit, "is_hub": True, "kind": "diffusers",
                "origin": {"id": text, "revision": commit, "is_hub": True}}
    raise HubError(f"base {where}: neither a converted cogvae checkpoint ({MANIFEST_NAME}) nor a diffusers VAE or "
                   f"pipeline repo ({CONFIG_NAME}, vae/{CONFIG_NAME} or model_index.json)")


def save(
    vae,
    out: str | os.PathLike,
    *,
    base: Optional[str | os.PathLike] = None,
    base_revision: Optional[str] = None,
    token: Any = None,
    dtype: Any = None,
    formats: Iterable[str] | str = FORMATS,
    validate: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``vae`` as a cogvae checkpoint folder at ``out``; returns a summary dict.

    ``base``: where the model came from, recorded in ``provenance.json``: the converted checkpoint
    folder it was loaded from, a diffusers VAE or pipeline folder, or a Hub repo id (a diffusers
    repo such as ``THUDM/CogVideoX-2b``, or a checkpoint pushed by ``cogvae push``, whose commit
    is recorded; ``base_revision``: the branch, tag or commit of a Hub base, default its main
    branch; ``token``: for a private or gated Hub base). It is checked before any work (see :func:`_base_source`: a local path must be a
    complete checkpoint or a diffusers folder, a repo id must be found on the Hub or in its cache;
    when the Hub cannot be reached and the repo is not cached, that is an error: pass the local
    checkpoint instead). ``cogvae push`` then names the nearest Hub repo among the model's
    ancestors (the base itself when it is one) as the card's ``base_model``, and keeps the licence
    of the model its weights were first converted from. ``dtype``: cast the stored parameters
    (default: keep the model's). ``formats``, ``validate`` and ``overwrite`` as for
    ``cogvae-convert``: each written format is loaded back and must give the saved parameters
    bit for bit and decode a small latent to finite values.
    """
    from .convert import ValidationError, _digests, _versions, validate_checkpoint_dir

    keep_heap_lean()
    formats = normalize_formats(formats)
    from .hub import local_path

    out = local_path(out)
    mapping = load_mapping()
    origin = _base_source(base, base_revision, token, config=vae.config)  # before any work: a bad base fails at once
    if origin is not None and origin.get("checkpoint"):
        check_not_inside(out, origin["checkpoint"])  # (``out`` = the base itself is a save in place)
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
        # "source": what the card names as the fine-tune's base: the nearest Hub repo among its
        # ancestors (the base itself, or what a local base checkpoint names), else the local base;
        # "origin": the model its weights were first converted from (its licence is kept).
        if origin is None:
            source = {"id": IN_MEMORY, "revision": None, "is_hub": False}
        elif origin["is_hub"] or not (origin.get("source") or {}).get("is_hub"):
            source = {k: origin[k] for k in ("id", "revision", "is_hub", "kind")}
        else:  # a local checkpoint of a Hub model: its card's base model
            source = dict(origin["source"])
        if origin is not None:
            source["origin"] = origin["origin"]
        provenance = {
            "source": {**source, "saved_from": IN_MEMORY},
            "base": origin,
            "mapping": provenance_entry(mapping),
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


def _other_variants(out: Path, variant: Optional[str], config: Any) -> list[str]:
    """The weights files of other variants in ``out``, a diffusers folder an export with
    ``overwrite`` replaces: exporting the fp16 variant next to the fp32 weights (the Hub's usual
    layout) keeps the fp32 ones, as diffusers' ``save_pretrained(variant=)`` does. They stay only
    beside the same network: an ``out`` whose config.json has other settings is refused
    (OutputError) rather than left with weights its new config does not describe."""
    from .checkpoint import _is_diffusers_export
    from .layout import weights_variant

    try:
        if not out.is_dir() or not _is_diffusers_export(out):
            return []  # not a diffusers folder: atomic_output_dir says what --overwrite may replace
        found = {p.name: weights_variant(p.name) for p in out.iterdir() if p.is_file()}
        others = sorted(name for name, (is_weights, v) in found.items() if is_weights and v != variant)
    except OSError:
        return []  # atomic_output_dir reports the folder it cannot look into
    if not others:
        return []
    from cogvae.model import ConfigError, VAEConfig

    try:
        theirs = VAEConfig.from_json_file(out / CONFIG_NAME)
    except ConfigError as e:
        raise OutputError(f"{out}: holds weights of other variants ({', '.join(others)}), but its config.json cannot "
                          f"be read to tell whether they fit this export's ({e}); export into another folder, or "
                          "remove them first") from None
    if theirs != config:
        mine = "the plain weights" if variant is None else f"variant {variant!r}"
        raise OutputError(f"{out}: holds weights of other variants ({', '.join(others)}) for another config than this "
                          f"export's: writing {mine} with this config.json would leave them described wrongly; "
                          "export into another folder, or remove them first")
    return others


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no copy of the bytes), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
    dtype: Any = None,
    variant: Optional[str] = None,
) -> dict[str, Any]:
    """Write a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
    atomically, through the inverse of the mapping table.

    ``dtype`` ('float32', 'bfloat16', 'float16'; default: keep each tensor's) casts the weights, for
    example an fp32 fine-tune back to the dtype its base model is published in; a finite weight
    that would overflow to Inf in float16 is refused. ``variant`` names the weights file as
    diffusers' ``save_pretrained(variant=)`` does (``diffusion_pytorch_model.fp16.safetensors``;
    ``from_pretrained(folder, variant="fp16")`` loads it).

    ``source``: a cogvae model in memory, a converted checkpoint folder, or the Hub repo id of one
    (pushed by ``cogvae push``; ``revision``, ``token``, ``cache_dir`` as for ``load``). ``format``
    picks 'orbax' or 'msgpack' (default Orbax when present; from the Hub, one already cached). The tensors are bit-identical to the ones
    converted (a round trip diffusers -> cogvae -> diffusers gives diffusers' bytes back), and
    diffusers' ``AutoencoderKLCogVideoX.from_pretrained`` loads the folder. A checkpoint is
    checked as ``load`` checks it, a model as ``save`` does: every parameter of its config's
    architecture present with its shape, nothing extra, allowed dtypes, finite values; every
    problem is named in one :class:`ConversionError` and nothing is written.
    """
    from .engine import export_tensors
    from .hub import local_path
    from .st_io import save_safetensors

    out = local_path(out)
    if variant is not None and not VARIANT_NAME.fullmatch(variant):
        raise ValueError(f"variant {variant!r}: {VARIANT_RULE}")
    weights_name = single_weights_name(variant)
    if dtype is not None:
        from .loading import resolve_dtype

        dtype = resolve_dtype(dtype)  # an unsupported dtype is refused here, before any work

    keep_heap_lean()
    mapping = mapping or load_mapping()
    if isinstance(source, _model_class()):
        if format is not None or revision is not None:
            raise ValueError("format= and revision= apply to a checkpoint, not to a model in memory")
        # cast here too: a NaN and a float16 overflow are named in one error, as for a checkpoint
        config, params, name, fmt = source.config, model_params(source, action="export", dtype=dtype), IN_MEMORY, None
    elif not isinstance(source, (str, os.PathLike)):  # an nnx.State, say: not a path to look up
        raise TypeError(f"expected a cogvae AutoencoderKLCogVideoX, a checkpoint folder or a Hub repo id, got "
                        f"{type(source).__name__} (for an nnx.State, nnx.update the model with it and export the model)")
    else:
        from .loading import fetch

        hub = fetch(source, kind="checkpoint", format=format, revision=revision, token=token, cache_dir=cache_dir)
        folder = hub.folder if hub is not None else local_path(source)
        from .checkpoint import _read_manifest

        _read_manifest(folder)  # not a checkpoint (or not there) is the input's problem, named first
        check_not_inside(out, folder)
        config, params, info = read_checkpoint(folder, format=hub.format if hub is not None else format)
        name, fmt = f"{source} ({info['format']})", info["format"]
    problems: list[str] = []
    if fmt is not None:
        # A checkpoint is checked as ``load`` checks it (a model in memory was, by model_params):
        # every parameter of its config's architecture present with its shape, nothing extra;
        # export_tensors then checks dtypes and values. All problems are raised together.
        expected = expected_shapes(config)
        problems = architecture_problems({k: tuple(a.shape) for k, a in params.items()}, expected, name)
        for key in [k for k, a in params.items() if tuple(a.shape) != expected.get(k)]:
            del params[key]  # named above; export_tensors checks the rest
    # lazy: every check passes first, then each tensor is transformed as the writer reaches it and
    # its source array is released, so memory stays near one copy of the weights.
    try:
        tensors = export_tensors(params, mapping, source_name=name, lazy=True, dtype=dtype)
    except ConversionError as e:
        problems += e.problems
    del params
    if problems:
        raise ConversionError(problems, header=f"cannot export {name}")
    kept = _other_variants(out, variant, config) if overwrite else []
    try:
        with atomic_output_dir(out, overwrite=overwrite, replaces="diffusers") as tmp:
            # as diffusers' save_pretrained writes it (keys sorted), so a config it wrote comes back as it was
            (tmp / CONFIG_NAME).write_text(json.dumps(config.to_diffusers_config(), indent=2, sort_keys=True) + "\n")
            save_safetensors(tensors, tmp / weights_name, metadata={"format": "pt"})
            for f in kept:  # the other variants' weights stay, as save_pretrained(variant=) leaves them
                _link_or_copy(out / f, tmp / f)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{out}: cannot write: {e.strerror or e}") from None
    return {"ok": True, "out": str(out), "checkpoint": str(source) if fmt else IN_MEMORY, "format": fmt,
            "num_tensors": len(tensors), "files": [CONFIG_NAME, weights_name], "kept": kept,
            "dtype": sorted({tensors.dtype_of(k).name for k in tensors})}

"""The conversion pipeline: diffusers CogVideoX VAE (local or Hub) -> verified cogvae checkpoint.

``convert(source, out)`` resolves the source, reads its config (strictly), reads the safetensors
one tensor at a time (``pread`` into fresh arrays; single file or sharded), converts them with the
strict mapping engine, writes Orbax and/or msgpack into a temporary sibling folder, validates the
written files by loading them back into the NNX VAE and decoding a small latent, writes
``provenance.json`` and the ``COMPLETE`` manifest, and only then renames the folder into place.
Peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.resources
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from cogvae.model import VAEConfig

from .checkpoint import (
    FORMATS,
    atomic_output_dir,
    finish_into,
    normalize_formats,
    params_to_model,
    read_format,
    tensor_digest,
    write_into,
    OutputError,
)
from .loading import SourceError, find_diffusers_vae, resolve_dtype
from .mapping import Mapping, load_mapping

__all__ = ["convert", "ValidationError", "default_source", "DEFAULT_SOURCE_ID", "validate_checkpoint_dir"]

DEFAULT_SOURCE_ID = "cogvae:tiny-cogvideox-vae"


class ValidationError(RuntimeError):
    """The written checkpoint did not load back or decode correctly (nothing was published)."""

    def __init__(self, message: str, report: Optional[dict] = None):
        super().__init__(message)
        self.report = report or {}


def default_source() -> Path:
    """The tiny diffusers-format CogVideoX VAE shipped with the package (works offline)."""
    return Path(str(importlib.resources.files("cogvae.converter") / "assets" / "tiny-cogvideox-vae"))


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("cogvae", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "msgpack", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Progress:
    """A click progress bar on stderr, or nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def bar(self, length: int, label: str):
        if self.quiet:
            return _NoBar()
        import click

        return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True, width=30)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int, current_item: Any = None) -> None:
        pass


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def smoke_latent_shape(config: VAEConfig) -> tuple[int, ...]:
    return (1, 1, 2, 2, config.latent_channels)


def validate_checkpoint_dir(
    folder: Path,
    config: VAEConfig,
    formats: Iterable[str],
    expected: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """Load each written format back into the NNX VAE, decode a small latent, compare.

    ``expected``: ``{dotted_path: tensor_digest}`` of the converted arrays; each format must match
    it exactly. Returns a report dict with ``ok``; never raises for a validation failure.
    """
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    shape = smoke_latent_shape(config)
    sc = config.spatial_compression
    want = (shape[0], shape[1], shape[2] * sc, shape[3] * sc, config.out_channels)
    z = jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    report: dict[str, Any] = {
        "ok": False,
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "latent_shape": list(shape),
        "expected_output_shape": list(want),
        "formats": {},
    }
    problems: list[str] = []
    outputs: dict[str, np.ndarray] = {}
    digests: dict[str, dict[str, str]] = {}
    for fmt in normalize_formats(list(formats)):
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        report["formats"][fmt] = entry
        try:
            params = read_format(folder, fmt)
        except Exception as e:  # noqa: BLE001 -- reported as a validation failure
            problems.append(f"{fmt}: cannot read back: {e}")
            entry["error"] = str(e)
            continue
        digests[fmt] = {k: tensor_digest(v) for k, v in params.items()}
        if expected is not None:
            diff = sorted(k for k in set(expected) | set(digests[fmt]) if expected.get(k) != digests[fmt].get(k))
            entry["params_match_converted"] = not diff
            if diff:
                problems.append(f"{fmt}: {len(diff)} parameter(s) differ from the converted ones, e.g. {diff[0]!r}")
        try:
            vae = params_to_model(config, params, source_name=f"{folder} ({fmt})")
            y = np.asarray(vae.decode(z))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{fmt}: cannot load into the NNX VAE or decode: {type(e).__name__}: {e}")
            entry["error"] = str(e)
            continue
        finally:
            del params
        finite = bool(np.isfinite(y).all())
        entry.update(output_shape=list(y.shape), finite=finite, seconds=round(time.perf_counter() - t0, 3))
        if tuple(y.shape) != want:
            problems.append(f"{fmt}: decode output shape {tuple(y.shape)}, expected {want}")
        if not finite:
            problems.append(f"{fmt}: decode output has NaN/Inf")
        outputs[fmt] = y
        del vae
    if len(digests) > 1:
        a, b = list(digests.values())[:2]
        same = a == b and all(np.array_equal(outputs[f], next(iter(outputs.values()))) for f in outputs)
        report["formats_identical"] = same
        if not same:
            problems.append("orbax and msgpack parameters (or their decodes) differ")
    report["problems"] = problems
    report["ok"] = not problems
    return report


# ----------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------


def _resolve(source: Optional[str], subfolder: str, revision: Optional[str], variant: Optional[str], quiet: bool):
    if source is None:
        if revision:
            raise SourceError("--revision needs a Hub SOURCE (the embedded default has no revisions)")
        return default_source(), DEFAULT_SOURCE_ID, None, False
    from . import hub

    try:
        r = hub.resolve_source(str(source), subfolder=subfolder, revision=revision, variant=variant, quiet=quiet)
    except hub.HubError as e:
        if Path(str(source)).exists() or not hub.looks_like_repo_id(str(source)):
            raise SourceError(str(e)) from None  # a local path problem: bad input, not network
        raise
    return Path(r.folder), r.source_id, r.revision, bool(r.is_hub)


def convert(
    source: Optional[str | os.PathLike] = None,
    out: str | os.PathLike = "ckpt",
    *,
    subfolder: str = "vae",
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    dtype: Any = None,
    formats: Iterable[str] | str = FORMATS,
    validate: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    create_pr: bool = False,
    dry_run: bool = False,
    token: Optional[str] = None,
    mapping: Optional[Mapping] = None,
) -> dict[str, Any]:
    """Convert a diffusers CogVideoX VAE into a cogvae checkpoint folder at ``out``.

    ``source``: a Hub repo id (``THUDM/CogVideoX-2b``), a local pipeline or VAE folder, or None for
    the embedded tiny VAE. ``dtype``: None keeps the source dtype; else 'float32' / 'bfloat16' /
    'float16'. ``formats``: 'orbax', 'msgpack' or both. Returns a summary dict (also what
    ``--json`` prints). Raises SourceError / SafetensorsError / ConfigError / ConversionError for
    bad input, OutputError for output problems, HubError for Hub problems and ValidationError when
    the written checkpoint fails validation; in every failure case nothing is left at ``out``.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    formats = normalize_formats(formats)
    np_dtype = None if dtype is None else np.dtype(resolve_dtype(dtype)).name
    ui = _Progress(quiet)
    out = Path(out)
    mapping = mapping or load_mapping()

    with atomic_output_dir(out, overwrite=overwrite) as tmp:  # refuses a bad --out before any work
        t0 = time.perf_counter()
        folder, source_id, resolved_rev, is_hub = _resolve(
            None if source is None else str(source), subfolder, revision, variant, quiet)
        src = find_diffusers_vae(folder, subfolder=subfolder, variant=variant)
        config = VAEConfig.from_json_file(src.config_path)
        timings["resolve"] = time.perf_counter() - t0
        ui.log(f"source: {source_id}" + (f" @ {resolved_rev}" if resolved_rev else "") + f" ({src.folder})")

        input_files = [src.config_path] + list(src.weight_files)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # hashing overlaps the conversion
        hashes = {p: pool.submit(_sha256, p) for p in input_files}
        try:
            from cogvae.model import abstract_model
            from flax import nnx

            from .engine import convert_flat, path_to_str
            from .st_io import open_safetensors

            t0 = time.perf_counter()
            tensors = open_safetensors(src.weights_path)
            keys = list(tensors.keys())
            _, abstract_state = nnx.split(abstract_model(config))
            with ui.bar(len(keys), "converting") as bar:

                def get(key: str) -> np.ndarray:
                    a = tensors.read_tensor(key)
                    bar.update(1)
                    return a

                flat = convert_flat((keys, get), abstract_state, mapping, dtype=np_dtype,
                                    source_name=str(src.weights_path))
            del abstract_state
            params: dict[str, np.ndarray] = {}
            for path in list(flat):  # contiguous, one tensor at a time (the transposed source is freed)
                params[path_to_str(path)] = np.ascontiguousarray(flat.pop(path))
            del flat
            timings["convert"] = time.perf_counter() - t0
            stored = sorted({a.dtype.name for a in params.values()})
            nbytes = sum(a.nbytes for a in params.values())
            expected = {k: tensor_digest(v) for k, v in params.items()} if validate else None

            t0 = time.perf_counter()
            with ui.bar(len(formats), "writing") as bar:
                known = write_into(tmp, params, config, formats=formats, progress=lambda _f: bar.update(1))
            del params
            timings["write"] = time.perf_counter() - t0

            if validate:
                t0 = time.perf_counter()
                ui.log("validating: loading each format back and decoding a "
                       f"{smoke_latent_shape(config)} latent")
                validation = validate_checkpoint_dir(tmp, config, formats, expected)
                timings["validate"] = time.perf_counter() - t0
                ui.log(_format_validation(validation))
                if not validation["ok"]:
                    raise ValidationError(
                        f"{out}: validation failed: " + "; ".join(validation["problems"]), validation)
            else:
                validation = {"skipped": True}

            input_info = [{"path": str(p), "name": p.relative_to(src.folder).as_posix(), "size": p.stat().st_size,
                           "sha256": hashes[p].result()} for p in input_files]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

        provenance = {
            "source": {
                "id": source_id,
                "revision": resolved_rev,
                "requested_revision": revision,
                "is_hub": is_hub,
                "subfolder": subfolder,
                "variant": variant,
                "folder": str(src.folder),
                "files": input_info,
            },
            "mapping": {"path": str(mapping.path), "sha256": mapping.sha256},
            "versions": _versions(),
            "dtype": {"requested": np_dtype, "stored": stored},
            "formats": list(formats),
            "num_parameters_bytes": nbytes,
            "validation": validation,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest = finish_into(tmp, formats, provenance, known)

    timings["total"] = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "ok": True,
        "out": str(out),
        "source": source_id,
        "revision": resolved_rev,
        "formats": list(formats),
        "dtype": stored,
        "num_tensors": len(keys),
        "bytes": nbytes,
        "files": {k: v["size"] for k, v in manifest["files"].items()},
        "validation": validation,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    ui.log(f"wrote {out} ({', '.join(formats)}; {len(keys)} tensors, {nbytes / 1e6:.1f} MB, "
           f"{', '.join(stored)}) in {timings['total']:.1f}s")

    if push_to_hub:
        from .push import push_checkpoint

        summary["push"] = push_checkpoint(out, push_to_hub, private=private, revision=None, create_pr=create_pr,
                                          dry_run=dry_run, token=token)
    return summary


def _format_validation(v: dict[str, Any]) -> str:
    lines = [f"validation: {'OK' if v.get('ok') else 'FAILED'} on {v.get('backend')} ({v.get('device_kind')}), "
             f"latent {tuple(v.get('latent_shape', ()))}"]
    for fmt, e in v.get("formats", {}).items():
        if "error" in e:
            lines.append(f"  {fmt}: error: {e['error']}")
        else:
            lines.append(f"  {fmt}: decode {tuple(e['output_shape'])}, finite={e['finite']}, "
                         f"params match={e.get('params_match_converted')}, {e['seconds']}s")
    if "formats_identical" in v:
        lines.append(f"  orbax == msgpack: {v['formats_identical']}")
    for p in v.get("problems", []):
        lines.append(f"  problem: {p}")
    return "\n".join(lines)


__all__ += ["OutputError"]

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
import gc
import hashlib
import importlib.metadata
import importlib.resources
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from cogvae.model import VAEConfig
from cogvae.model.config import ConfigError

from . import interrupts
from .checkpoint import (
    FORMATS,
    CheckpointError,
    atomic_output_dir,
    check_not_source,
    finish_into,
    keep_heap_lean,
    normalize_formats,
    release_free_memory,
    tensor_digest,
    write_into,
    OutputError,
)
from .loading import SourceError, find_diffusers_vae, resolve_dtype
from .mapping import Mapping, load_mapping, provenance_entry
from .st_io import SafetensorsError

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


class _Progress:
    """A click progress bar on stderr, or nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    # Progress is best effort: a stderr that is closed, full or a closed pipe (``2>&-``,
    # ``2>&1 | head -1``) silences it; the conversion and its --json summary go on.
    def log(self, msg: str) -> None:
        if not self.quiet and sys.stderr is not None:  # (None: print would write to stdout)
            try:
                print(msg, file=sys.stderr, flush=True)
            except (OSError, ValueError, AttributeError):
                self.quiet = True

    def bar(self, length: int, label: str):
        if self.quiet or sys.stderr is None:
            return _NoBar()
        import click

        return _BestEffortBar(self, lambda: click.progressbar(length=length, label=label, file=sys.stderr,
                                                              show_pos=True, width=30))


class _BestEffortBar:
    """A click progress bar that goes quiet (and quiets its ``_Progress``) when stderr fails."""

    def __init__(self, progress: "_Progress", make):
        self.progress, self.bar = progress, None
        try:
            self.bar = make().__enter__()
        except (OSError, ValueError, AttributeError):
            progress.quiet = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            try:
                self.bar.__exit__(*exc)
            except (OSError, ValueError, AttributeError):
                self.progress.quiet = True
        return False

    def update(self, n: int, current_item: Any = None) -> None:
        if self.bar is None:
            return
        try:
            self.bar.update(n, current_item)
        except (OSError, ValueError, AttributeError):
            self.bar, self.progress.quiet = None, True


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int, current_item: Any = None) -> None:
        pass


def _digests(params: dict[str, np.ndarray]) -> dict[str, str]:
    """``tensor_digest`` of every array, on all cores (crc32 releases the GIL)."""
    from .engine import default_workers

    with concurrent.futures.ThreadPoolExecutor(max_workers=default_workers()) as pool:
        return dict(zip(params, pool.map(tensor_digest, params.values())))


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


#: The smoke decode's conv lowering. Validation checks that the written weights load and decode
#: (every lowering is parity-tested against diffusers); "3d" needs no per-frame kernel slices, so on
#: CPU its compiled decode adds the least memory on top of the weights.
SMOKE_CONV_IMPL = "3d"


def smoke_latent_shape(config: VAEConfig) -> tuple[int, ...]:
    # 4x4, not smaller: with a 2x2 latent XLA's CPU compiler rewrites the 3x3 convs of the
    # deepest level into convs of flipped kernels, a temporary copy of the decoder's weights.
    return (1, 1, 4, 4, config.latent_channels)


def _fill_pairs(pairs: list, items: Iterable[tuple[str, Any]], source_name: str, *, exact_dtype: bool) -> dict[str, str]:
    """Put streamed ``(dotted path, array)`` into the model's flat state ``pairs``, in place.

    Each array replaces the leaf it belongs to at once (the previous array, if any, is freed then),
    so memory stays near one copy of the weights. Strict: every parameter exactly once, with the
    model's shape (and, with ``exact_dtype``, the dtype already there). Returns ``{path: digest}``;
    raises :class:`CheckpointError` listing every problem.
    """
    from .checkpoint import adopt_array
    from .engine import extra_problem, missing_problem, path_to_str

    where = {path_to_str(p): i for i, (p, _v) in enumerate(pairs)}
    seen: dict[str, str] = {}
    problems = []
    for name, a in items:
        i = where.get(name)
        if i is None:
            problems.append(extra_problem(source_name, name, a.shape))
            continue
        if name in seen:
            problems.append(f"{source_name}: parameter {name!r} appears twice")
            continue
        seen[name] = tensor_digest(a)
        path, var = pairs[i]
        old = var.get_value()
        if tuple(a.shape) != tuple(old.shape) or (exact_dtype and np.dtype(a.dtype) != np.dtype(old.dtype)):
            problems.append(f"{source_name}: parameter {name!r} is {np.dtype(a.dtype).name}{list(a.shape)}, "
                            f"expected {np.dtype(old.dtype).name}{list(old.shape)}")
            continue
        del old
        pairs[i] = (path, var.replace(adopt_array(a)))
        del a, var
    problems += [missing_problem(source_name, path_to_str(p), v.get_value().shape)
                 for p, v in (pairs[i] for n, i in where.items() if n not in seen)]
    if problems:
        raise CheckpointError(f"{source_name}: parameters do not fit the model: {len(problems)} problem(s):\n"
                              + "\n".join(f"  - {p}" for p in problems))
    return seen


def validate_checkpoint_dir(
    folder: Path,
    config: VAEConfig,
    formats: Iterable[str],
    expected: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """Load each written format back into the NNX VAE, decode a small latent, compare.

    One model serves every format. Its abstract state (``nnx.eval_shape``, no weights) takes the
    parameter dtypes from the first format's metadata, and the smoke decode is compiled from those
    shapes before any weight is loaded. Then each format is streamed into the model's state, a
    tensor (msgpack) or a small group (Orbax) at a time, replacing the previous format's arrays,
    merged into the VAE and decoded. So validation holds one copy of the weights, compiles once,
    and every format must decode bit-identically.

    ``expected``: ``{dotted_path: tensor_digest}`` of the converted arrays; each format must match
    it exactly. Returns a report dict with ``ok``; never raises for a validation failure.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cogvae.model import abstract_model
    from cogvae.model.vae import compile_decode_first_batch

    from .checkpoint import format_meta, iter_format
    from .engine import path_to_str

    dev = jax.devices()[0]
    shape = smoke_latent_shape(config)
    sc = config.spatial_compression
    want = (shape[0], shape[1], shape[2] * sc, shape[3] * sc, config.out_channels)
    z = jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    formats = normalize_formats(list(formats))
    report: dict[str, Any] = {
        "ok": False,
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "latent_shape": list(shape),
        "expected_output_shape": list(want),
        "conv_impl": SMOKE_CONV_IMPL,
        "formats": {fmt: {} for fmt in formats},
    }
    problems: list[str] = []
    outputs: dict[str, np.ndarray] = {}
    digests: dict[str, dict[str, str]] = {}

    # The model, abstract: parameter dtypes as stored (the first readable format's metadata).
    graphdef = pairs = run = None
    for fmt in formats:
        try:
            meta = format_meta(folder, fmt)
        except CheckpointError as e:
            report["formats"][fmt]["error"] = str(e)
            problems.append(f"{fmt}: cannot read back: {e}")
            continue
        graphdef, abstract_state = nnx.split(abstract_model(config))
        pairs = []
        for path, var in nnx.to_flat_state(abstract_state):
            shp, dt = meta.get(path_to_str(path), (None, None))
            value = var.get_value()
            dt = dt if shp is not None and tuple(shp) == tuple(value.shape) else value.dtype
            pairs.append((path, var.replace(jax.ShapeDtypeStruct(value.shape, dt))))
        del abstract_state
        try:
            t0 = time.perf_counter()
            run = compile_decode_first_batch(graphdef, nnx.from_flat_state(pairs), shape, impl=SMOKE_CONV_IMPL)
            report["compile_seconds"] = round(time.perf_counter() - t0, 3)
        except Exception as e:  # noqa: BLE001 -- reported as a validation failure
            problems.append(f"cannot compile the smoke decode: {type(e).__name__}: {e}")
            run = None
        break
    gc.collect()  # the compiler's and flax's transient objects, before the weights arrive
    release_free_memory()

    for fmt in formats:
        entry = report["formats"][fmt]
        if "error" in entry:
            continue
        if pairs is None:
            entry["error"] = "not checked: the model could not be built from an earlier format"
            continue
        t0 = time.perf_counter()
        name = f"{folder} ({fmt})"
        try:
            digests[fmt] = _fill_pairs(pairs, iter_format(folder, fmt), name,
                                       exact_dtype=len(digests) > 0)
            vae = nnx.merge(graphdef, nnx.from_flat_state(pairs))  # the NNX VAE, holding these weights
        except Exception as e:  # noqa: BLE001 -- reported as a validation failure
            problems.append(f"{fmt}: cannot read back or load into the NNX VAE: {e}")
            entry["error"] = str(e)
            pairs = None
            continue
        if expected is not None:
            diff = sorted(k for k in set(expected) | set(digests[fmt]) if expected.get(k) != digests[fmt].get(k))
            entry["params_match_converted"] = not diff
            if diff:
                problems.append(f"{fmt}: {len(diff)} parameter(s) differ from the converted ones, e.g. {diff[0]!r}")
        if run is None:
            entry["error"] = "no smoke decode (it did not compile)"
            continue
        try:
            y = np.asarray(run(nnx.split(vae)[1], z))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{fmt}: decode failed: {type(e).__name__}: {e}")
            entry["error"] = str(e)
            continue
        finally:
            del vae
            gc.collect()  # the merged module graph is cyclic; `pairs` must hold the only references
        finite = bool(np.isfinite(y).all())
        entry.update(output_shape=list(y.shape), finite=finite, seconds=round(time.perf_counter() - t0, 3))
        if tuple(y.shape) != want:
            problems.append(f"{fmt}: decode output shape {tuple(y.shape)}, expected {want}")
        if not finite:
            problems.append(f"{fmt}: decode output has NaN/Inf")
        outputs[fmt] = y
    del pairs
    gc.collect()
    if len(formats) > 1:
        same = (len(digests) == len(formats) and len({tuple(sorted(d.items())) for d in digests.values()}) == 1
                and len(outputs) == len(formats)
                # equal_nan: a NaN decode is reported above; it does not make identical formats differ
                and all(np.array_equal(o, next(iter(outputs.values())), equal_nan=True) for o in outputs.values()))
        report["formats_identical"] = same
        if not same:
            problems.append("orbax and msgpack parameters (or their decodes) differ")
    report["problems"] = problems
    report["ok"] = not problems
    return report


# ----------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------


def _resolve(source: Optional[str], subfolder: str, revision: Optional[str], variant: Optional[str], quiet: bool,
             token: Optional[str] = None):
    if source is None:
        if revision:
            raise SourceError("--revision needs a Hub SOURCE (the embedded default has no revisions)")
        return default_source(), DEFAULT_SOURCE_ID, None, False
    from . import hub

    try:
        r = hub.resolve_source(str(source), subfolder=subfolder, revision=revision, variant=variant, quiet=quiet,
                               token=token, kind="diffusers")  # a checkpoint repo: refused before its weights
    except hub.HubError as e:
        if hub.input_exists(hub.local_path(str(source))) or not hub.looks_like_repo_id(str(source)):
            raise SourceError(str(e)) from None  # a local path problem: bad input, not network
        raise
    if r.kind == "checkpoint":
        where = f"{source}@{r.revision}" if r.is_hub else str(source)
        raise SourceError(f"{where}: a converted cogvae checkpoint, not a diffusers VAE: load it with "
                          "cogvae.converter.load, or turn it back into diffusers files with `cogvae export-diffusers`")
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
    push_revision: Optional[str] = None,
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
    ``push_to_hub``: a repo id to push the finished checkpoint to (``push_checkpoint``; its result is
    the summary's ``"push"``); a malformed one (PushUsageError), or for a real push no token or
    offline mode (PushError), is refused before anything is read or written. A push that fails
    later leaves the written checkpoint at ``out``: its PushError says so and gives the ``cogvae
    push`` line that retries the upload, and carries the conversion's summary as ``.summary``.
    """
    if push_to_hub is not None:  # a push that cannot succeed is refused before any work
        from .push import check_push_target

        check_push_target(push_to_hub, dry_run=dry_run, token=token, revision=push_revision,
                          revision_option="push_revision")
    t_start = time.perf_counter()
    keep_heap_lean()  # peak memory near one copy of the weights (see keep_heap_lean)
    timings: dict[str, float] = {}
    formats = normalize_formats(formats)
    np_dtype = None if dtype is None else np.dtype(resolve_dtype(dtype)).name
    ui = _Progress(quiet)
    from .hub import local_path

    out = local_path(out)
    mapping = mapping or load_mapping()

    with atomic_output_dir(out, overwrite=overwrite) as tmp:  # refuses a bad --out before any work
        t0 = time.perf_counter()
        folder, source_id, resolved_rev, is_hub = _resolve(
            None if source is None else str(source), subfolder, revision, variant, quiet, token)
        check_not_source(out, folder)  # --out = the pipeline folder would replace what is read
        src = find_diffusers_vae(folder, subfolder=subfolder, variant=variant)
        if not is_hub:
            from .hub import hub_snapshot_of

            snapshot = hub_snapshot_of(src.folder)
            if snapshot is not None:
                # a Hub cache snapshot given by its path (as `hf download` prints it): the repo and
                # commit it holds, as for the repo id, so the card names the base model and keeps
                # its licence, and no folder of this machine goes into provenance.json
                source_id, resolved_rev, root = snapshot
                # the snapshot folder as src's paths spell it (relative when they are), to name each
                # file by its path in the repo
                folder = Path(os.path.relpath(root)) if not src.folder.is_absolute() else root
                is_hub = True
        # an unknown config key is reported together with the weights' problems (one error)
        try:  # read once: the bytes parsed are the bytes hashed into provenance.json
            config_bytes = src.config_path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{src.config_path}: cannot read config: {e}") from None
        config, config_error = VAEConfig.from_json_file_ignoring_unknown(src.config_path, raw=config_bytes)
        timings["resolve"] = time.perf_counter() - t0
        ui.log(f"source: {source_id}" + (f" @ {resolved_rev}" if resolved_rev else "") + f" ({src.folder})")

        from .st_io import open_safetensors

        # opened despite problems with the files (a missing shard, ...): they are reported
        # together with every problem of the readable tensors, in one error. Each file is read
        # (and hashed) through the descriptor its header came from: a source replaced on disk
        # meanwhile cannot mix two files, and one written in place is refused below.
        tensors = open_safetensors(src.weights_path, strict=False)
        input_files = [src.config_path, *tensors.files]  # the shards of the index as it was read
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # hashing overlaps the conversion
        hashes = {src.config_path: pool.submit(hashlib.sha256(config_bytes).hexdigest)}
        hashes.update({p: pool.submit(tensors.file_sha256, p) for p in input_files[1:]})
        try:
            from cogvae.model import abstract_model
            from flax import nnx

            from .engine import convert_flat, path_to_str, with_config_problems

            t0 = time.perf_counter()
            keys = list(tensors.keys())
            _, abstract_state = nnx.split(abstract_model(config))
            with ui.bar(len(keys), "converting") as bar, with_config_problems(config_error, src.config_path):
                flat = convert_flat((keys, tensors.read_tensor), abstract_state, mapping, dtype=np_dtype,
                                    source_name=str(src.weights_path), on_tensor=lambda _k: bar.update(1),
                                    file_of=getattr(tensors, "file_of", None), source_problems=tensors.problems,
                                    unreadable=tensors.unreadable)
            for future in hashes.values():  # the digests are of the bytes converted only if unchanged
                future.exception()
            changed = tensors.change_problems()
            if changed:
                raise SafetensorsError(changed[0] if len(changed) == 1 else
                                       f"{src.weights_path}: source changed while being read:\n  "
                                       + "\n  ".join(changed), changed)
            del abstract_state
            params: dict[str, np.ndarray] = {}
            for path in list(flat):  # contiguous, one tensor at a time (the transposed source is freed)
                params[path_to_str(path)] = np.ascontiguousarray(flat.pop(path))
            del flat
            timings["convert"] = time.perf_counter() - t0
            stored = sorted({a.dtype.name for a in params.values()})
            nbytes = sum(a.nbytes for a in params.values())
            expected = _digests(params) if validate else None

            t0 = time.perf_counter()
            with ui.bar(len(formats), "writing") as bar:
                try:
                    known = write_into(tmp, params, config, formats=formats, progress=lambda _f: bar.update(1))
                except OSError as e:  # disk full, file too large, ...: an output problem (exit 4)
                    raise OutputError(f"{out}: cannot write checkpoint: {e.strerror or e}") from None
            del params
            release_free_memory()
            timings["write"] = time.perf_counter() - t0

            if validate:
                t0 = time.perf_counter()
                ui.log("validating: loading each format back and decoding a "
                       f"{smoke_latent_shape(config)} latent")
                validation = validate_checkpoint_dir(tmp, config, formats, expected)
                timings["validate"] = time.perf_counter() - t0
                ui.log(_format_validation(validation))
                # an interrupt during the read-back can come back wrapped as a read error (Orbax,
                # tensorstore): a cancelled run is not a failed validation
                interrupts.check()
                if not validation["ok"]:
                    raise ValidationError(
                        f"{out}: validation failed: " + "; ".join(validation["problems"]), validation)
            else:
                validation = {"skipped": True}

            # A Hub source's files by their paths in the repo (the commit says which): their place
            # in this machine's Hub cache would name the user's folders in a pushed provenance.json.
            input_info = [{"path": p.relative_to(folder).as_posix() if is_hub else str(p),
                           "name": p.relative_to(src.folder).as_posix(),
                           "size": len(config_bytes) if p == src.config_path else tensors.file_size(p),
                           "sha256": hashes[p].result()} for p in input_files]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            tensors.close()

        provenance = {
            "source": {
                "id": source_id,
                "revision": resolved_rev,
                "requested_revision": revision,
                "is_hub": is_hub,
                # where the VAE was found: "" when the source is the VAE folder itself (found first,
                # whatever ``subfolder`` asked for, as diffusers' from_pretrained of a VAE repo)
                "subfolder": "" if src.folder == folder else src.folder.relative_to(folder).as_posix(),
                "variant": variant,
                **({} if is_hub else {"folder": str(src.folder)}),
                "files": input_info,
            },
            "mapping": provenance_entry(mapping),
            "versions": _versions(),
            "dtype": {"requested": np_dtype, "stored": stored},
            "formats": list(formats),
            "num_parameters_bytes": nbytes,
            "validation": validation,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            manifest = finish_into(tmp, formats, provenance, known)
        except OSError as e:
            raise OutputError(f"{out}: cannot write checkpoint: {e.strerror or e}") from None

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

    if push_to_hub is not None:
        from .push import PushError, push_checkpoint

        retry = " ".join(["cogvae push", shlex.quote(str(out)), shlex.quote(push_to_hub)]
                         + (["--private"] if private else [])
                         + (["--revision", shlex.quote(push_revision)] if push_revision else [])
                         + (["--create-pr"] if create_pr else []) + (["--dry-run"] if dry_run else []))
        try:
            summary["push"] = push_checkpoint(out, push_to_hub, private=private, revision=push_revision,
                                              create_pr=create_pr, dry_run=dry_run, token=token, quiet=quiet)
        except KeyboardInterrupt as e:  # the conversion is done: the interrupt must not read as "removed"
            e.args = (f"the upload was interrupted; the converted checkpoint is complete at {out}: retry the "
                      f"upload with `{retry}`",)
            raise
        except PushError as e:
            # The conversion is done and kept: say where, and how to retry only the upload; the
            # summary travels with the error (``--json`` still prints it).
            e.args = (f"{e}; the converted checkpoint is complete at {out}: retry the upload with `{retry}`",)
            e.summary = {**summary, "ok": False, "push": {"ok": False, "error": str(e), "retry": retry}}
            raise
    return summary


def _format_validation(v: dict[str, Any]) -> str:
    lines = [f"validation: {'OK' if v.get('ok') else 'FAILED'} on {v.get('backend')} ({v.get('device_kind')}), "
             f"latent {tuple(v.get('latent_shape', ()))}, smoke decode compiled in {v.get('compile_seconds', '?')}s"]
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

"""Resolve a source: a local folder, or a Hugging Face Hub repo id fetched with
``huggingface_hub.snapshot_download``.

A Hub repo is either a diffusers repo (a pipeline with ``<subfolder>/``, or a bare VAE) or a
converted cogvae checkpoint pushed by ``cogvae push``. A first, small request fetches only the
files that tell the two apart (``COMPLETE``, ``config.json``, ``model_index.json`` and
``<subfolder>/config.json``); the second, pinned to the commit the first resolved, fetches only
what is needed: for diffusers the VAE's config and safetensors weights of the requested variant
(single file or sharded), so a pipeline repo's multi-GB transformer is never downloaded; for a
checkpoint one format (``orbax/`` or ``params.msgpack``), not both. ``HF_HUB_OFFLINE=1`` with a
populated Hub cache works without a network; every Hub failure becomes one :class:`HubError`
line naming the repo and revision.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .layout import CONFIG_NAME, FORMAT_PREFIX, MANIFEST_NAME, PROVENANCE_NAME, WEIGHTS_NAME, weights_in

__all__ = ["HubError", "ResolvedSource", "resolve_source", "allow_patterns", "checkpoint_patterns", "looks_like_repo_id"]


# Hub repo ids: "namespace/name", letters, digits, '-', '_', '.'; no '--' or '..' (hub rules).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+\Z")
_COMMIT = re.compile(r"[0-9a-f]{40}\Z")


class HubError(RuntimeError):
    """A source that cannot be resolved (missing folder, Hub / cache failure); one clear message."""


@dataclass
class ResolvedSource:
    """Where a source's files lie locally.

    ``folder``: the local folder (for a Hub repo, the snapshot folder in the Hub cache: a pipeline
    root holding ``<subfolder>/``, or the VAE folder itself when ``subfolder`` is empty);
    ``source_id``: the repo id, or the local path as given; ``revision``: the resolved 40-hex commit
    of a Hub snapshot (None for a local folder); ``is_hub``: whether it came from the Hub;
    ``kind``: ``"diffusers"`` or ``"checkpoint"`` (a converted cogvae checkpoint, whose parameters
    are at the folder's root); ``format``: for a checkpoint from the Hub, the format fetched.
    """

    folder: Path
    source_id: str
    revision: Optional[str]
    is_hub: bool
    kind: str = "diffusers"
    format: Optional[str] = None


def looks_like_repo_id(source: str) -> bool:
    """``org/name`` (exactly one slash, Hub-legal characters, not a relative path like ``./x``)."""
    if source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if not _REPO_ID.match(source):
        return False
    return "--" not in source and ".." not in source and not source.endswith(".")


def _looks_local(source: str) -> bool:
    return (
        source.startswith(("./", "../", "/", "~"))
        or source in (".", "..")
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def allow_patterns(subfolder: str = "vae", variant: Optional[str] = None) -> list[str]:
    """The files of one diffusers VAE (in ``subfolder``, or the repo root when empty) to fetch.

    Weights: ``diffusion_pytorch_model[.<variant>].safetensors``, or the sharded form: diffusers
    writes the index as ``diffusion_pytorch_model.safetensors.index[.<variant>].json`` and shards as
    ``diffusion_pytorch_model[.<variant>]-00001-of-0000N.safetensors``; the index spelling
    ``diffusion_pytorch_model[.<variant>].safetensors.index.json`` is fetched too.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder and subfolder.strip("/") else ""
    v = f".{variant}" if variant else ""
    pats = [
        f"{prefix}config.json",
        f"{prefix}{WEIGHTS_NAME}{v}.safetensors",
        f"{prefix}{WEIGHTS_NAME}{v}-*-of-*.safetensors",
        f"{prefix}{WEIGHTS_NAME}.safetensors.index{v}.json",
        f"{prefix}{WEIGHTS_NAME}{v}.safetensors.index.json",
        "model_index.json",
    ]
    return list(dict.fromkeys(pats))


def checkpoint_patterns(format: str) -> list[str]:
    """The files of a converted checkpoint to fetch for one format ('orbax' or 'msgpack')."""
    if format not in FORMAT_PREFIX:
        raise ValueError(f"unknown format {format!r}; use 'orbax' or 'msgpack'")
    target = FORMAT_PREFIX[format]
    return [MANIFEST_NAME, CONFIG_NAME, PROVENANCE_NAME, target + "*" if target.endswith("/") else target]


def _format_files(manifest: dict, format: str) -> list[str]:
    """The manifest's paths of one format (as ``read_checkpoint`` selects them)."""
    return [rel for rel in manifest.get("files", {}) if rel.startswith(FORMAT_PREFIX[format])]


def _checkpoint_format(snapshot: Path, where: str, format: Optional[str]) -> tuple[str, list[str]]:
    """The format to fetch from a checkpoint repo, from its manifest: ``format`` when given (it must
    be there); else one whose files are all in the cached snapshot already, else Orbax when the
    checkpoint has it (as ``load`` of a local folder), else msgpack. Also the files reading it
    needs (the config and that format's files)."""
    try:
        manifest = json.loads((snapshot / MANIFEST_NAME).read_text())
        formats = [f for f in manifest.get("formats") or [] if f in FORMAT_PREFIX]
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (OSError, ValueError, AttributeError) as e:
        raise HubError(f"{where}: corrupt {MANIFEST_NAME} manifest in the snapshot at {snapshot} ({e})") from None
    if format is not None:
        if format not in FORMAT_PREFIX:
            raise HubError(f"{where}: unknown format {format!r}; use 'orbax' or 'msgpack'")
        if format not in formats:
            raise HubError(f"{where}: the checkpoint holds no {format} parameters (formats: {', '.join(formats) or 'none'})")
    elif not formats:
        raise HubError(f"{where}: the checkpoint's {MANIFEST_NAME} manifest lists no parameter format")
    else:
        cached = [f for f in formats if all((snapshot / rel).is_file() for rel in _format_files(manifest, f))]
        format = cached[0] if cached else "orbax" if "orbax" in formats else formats[0]
    return format, [CONFIG_NAME, *_format_files(manifest, format)]


def _silent_tqdm():
    """A tqdm class that never draws (passed as ``tqdm_class``: no global progress-bar state)."""
    from tqdm.auto import tqdm

    class _Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def pipeline_vaes(folder: Path) -> list[str]:
    """The components a pipeline's ``model_index.json`` declares as diffusers VAEs."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and "AutoencoderKL" in str(v[1]))


def _has_vae_files(vae: Path, variant: Optional[str]) -> bool:
    """``vae`` holds a config and complete weights of ``variant``: the single file, or an index
    and every shard it names."""
    weights = weights_in(vae, variant)
    if weights is None or not (vae / CONFIG_NAME).is_file():
        return False
    if weights.name.endswith(".safetensors"):
        return True
    try:
        shards = set(json.loads(weights.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((vae / str(f)).is_file() for f in shards)


def _check_snapshot(folder: Path, repo_id: str, rev: str, subfolder: str, variant: Optional[str]) -> None:
    """The snapshot must hold the config and the requested weights (offline, snapshot_download
    returns a cached snapshot without checking which files it holds)."""
    vae = folder / subfolder if subfolder else folder
    where = f"{repo_id}@{rev}"
    if not (vae / CONFIG_NAME).is_file():
        rel = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
        hint = ""
        if subfolder and not vae.is_dir():
            named = pipeline_vaes(folder)
            hint = (f" (its model_index.json names the VAE {', '.join(repr(n) for n in named)}: pass --subfolder "
                    f"{named[0]})" if named else f" (no '{subfolder}/' folder: pass --subfolder '' for a VAE-only repo?)")
        raise HubError(f"{where}: no {rel} in the snapshot at {folder}{hint}")
    v = f".{variant}" if variant else ""
    if weights_in(vae, variant) is None:
        found = sorted(p.name for p in vae.glob(f"{WEIGHTS_NAME}*"))
        rel = f"{subfolder}/" if subfolder else ""
        raise HubError(
            f"{where}: no {rel}{WEIGHTS_NAME}{v}.safetensors (nor a sharded index) in the snapshot at {folder}"
            + (f" (found: {', '.join(found)})" if found else "")
            + ("" if variant else "; pass --variant (e.g. fp16) if the repo only has variant weights")
        )


def _hub_error(e: BaseException, repo_id: str, revision: Optional[str], cache: str) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    where = f"{repo_id}@{rev}"
    if isinstance(e, GatedRepoError):
        return HubError(f"{where}: gated repo: accept its licence on https://huggingface.co/{repo_id} and log in "
                        "(`hf auth login` or HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        # resolve_source only asks the Hub when no local folder has this name: say so, for a
        # mistyped local path that looks like 'org/name'
        return HubError(f"{repo_id}: no such local folder, and repository not found on the Hugging Face Hub (or "
                        "private and not authorised: log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo_id}: revision {rev!r} not found (no such branch, tag or commit)")
    if isinstance(e, IncompleteSnapshotError):
        return HubError(f"{where}: the cached snapshot in {cache} is incomplete and the Hub cannot be reached; "
                        "re-run with network access")
    if isinstance(e, LocalEntryNotFoundError):
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        offline = constants.is_offline_mode() or isinstance(e.__cause__, OfflineModeIsEnabled)
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub cannot be reached (no network?)"
        repo_dir = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
        repo_cached = repo_dir.is_dir()
        if revision and _COMMIT.match(revision) and (repo_dir / "snapshots" / revision).is_dir():
            # The commit is cached, but not every file asked for (hf_hub_download's error, as
            # snapshot_download reports a commit given by its sha).
            return HubError(f"{where}: the cached snapshot in {cache} is incomplete and {why}; "
                            "re-run with network access")
        what = (f"revision {rev!r} of {repo_id} is not in the Hub cache {cache}" if repo_cached
                else f"{repo_id} is not in the Hub cache {cache}")
        return HubError(f"{what} and {why}; download it once with network access, or pass a local folder")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return HubError(f"{where}: not authorised (HTTP {status}): log in with `hf auth login` or set HF_TOKEN")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return HubError(f"{where}: Hub request failed: {first}")
    if isinstance(e, HFValidationError):
        return HubError(f"{repo_id!r}: not a valid Hub repo id: {str(e).strip().splitlines()[0]}")
    try:
        from httpx2 import TransportError as _Transport  # huggingface_hub's HTTP client
    except ImportError:  # pragma: no cover - older huggingface_hub
        _Transport = ConnectionError
    if isinstance(e, (ConnectionError, TimeoutError, OSError, _Transport)):
        return HubError(f"{where}: cannot reach the Hugging Face Hub and nothing is cached in {cache}: "
                        f"{type(e).__name__}: {e}")
    return HubError(f"{where}: download failed: {type(e).__name__}: {e}")


def _download(repo_id: str, revision: Optional[str], patterns: list[str], cache: str, token, quiet: bool) -> Path:
    from huggingface_hub import snapshot_download

    kwargs = dict(repo_id=repo_id, repo_type="model", revision=revision, cache_dir=cache,
                  allow_patterns=patterns, library_name="cogvae")
    if token is not None:
        kwargs["token"] = token
    if quiet:
        kwargs["tqdm_class"] = _silent_tqdm()
    try:
        return Path(snapshot_download(**kwargs))
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one HubError line
        raise _hub_error(e, repo_id, revision, cache) from e


def resolve_source(
    source: str | os.PathLike,
    *,
    subfolder: str = "vae",
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    format: Optional[str] = None,
    quiet: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    also: tuple[str, ...] | list[str] = (),
) -> ResolvedSource:
    """A local folder as is, or a Hub repo id (``org/name``) downloaded into the Hub cache.

    The result's ``kind`` says whether it is a diffusers VAE (or pipeline) or a converted cogvae
    checkpoint. For a diffusers repo only the VAE files are fetched (see :func:`allow_patterns`);
    for a checkpoint repo only one format (``format``, or see :func:`_checkpoint_format`).
    ``revision`` is a branch, tag or commit; the result's ``revision`` is the resolved commit sha,
    and both requests read that one commit. ``quiet`` hides huggingface_hub's progress bars.
    ``cache_dir`` defaults to huggingface_hub's (``HF_HUB_CACHE``). ``also``: more files of a
    checkpoint repo to fetch where the repo has them (``verify`` asks for the diffusers copy a
    ``push --with-diffusers`` adds); as the cache cannot tell whether the repo has them, the
    second request is then always made. Raises :class:`HubError` with one clear line on any failure.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise HubError(f"{text}: --revision applies to Hub repo ids only, not to a local folder")
        if not path.is_dir():
            raise HubError(f"{text}: not a folder (expected a diffusers VAE or pipeline folder)")
        from .checkpoint import looks_like_checkpoint

        kind = "checkpoint" if looks_like_checkpoint(path) else "diffusers"
        return ResolvedSource(folder=path, source_id=text, revision=None, is_hub=False, kind=kind)
    if _looks_local(text) or not looks_like_repo_id(text):
        hint = "" if _looks_local(text) else " and not a Hub repo id ('org/name')"
        raise HubError(f"{text}: no such folder{hint}")

    from huggingface_hub import constants

    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    sub = subfolder.strip("/") if subfolder else ""
    # First request: the few small files that tell a checkpoint repo from a diffusers one.
    probe = [MANIFEST_NAME, CONFIG_NAME, "model_index.json"] + ([f"{sub}/{CONFIG_NAME}"] if sub else [])
    snapshot = _download(text, revision, probe, cache, token, quiet)
    commit = snapshot.name if _COMMIT.match(snapshot.name) else None
    # The second request is pinned to the commit just resolved, so a push landing in between
    # cannot mix two commits' files; and as a commit's files never change, it is skipped when the
    # probe's snapshot already holds everything needed (no retries to wait for when the Hub
    # cannot be reached).
    pinned = commit or revision
    where = f"{text}@{commit or revision or 'main'}"
    if (snapshot / MANIFEST_NAME).is_file():
        fmt, needed = _checkpoint_format(snapshot, where, format)

        def missing_files() -> list[str]:
            return [rel for rel in needed if not (snapshot / rel).is_file()]

        if not commit or missing_files() or also:
            snapshot = _download(text, pinned, checkpoint_patterns(fmt) + list(also), cache, token, quiet)
            if not commit:  # not pinned: the manifest fetched now is the one to follow
                fmt, needed = _checkpoint_format(snapshot, where, fmt)
        missing = missing_files()
        if missing:
            raise HubError(f"{where}: the cached snapshot at {snapshot} lacks {len(missing)} file(s) of the "
                           f"checkpoint's {fmt} format (first: {missing[0]}) and the Hub cannot be reached; "
                           "re-run with network access")
        return ResolvedSource(folder=snapshot, source_id=text, revision=commit, is_hub=True, kind="checkpoint",
                              format=fmt)
    if sub and not (snapshot / sub / CONFIG_NAME).is_file() and (snapshot / CONFIG_NAME).is_file() \
            and not (snapshot / "model_index.json").is_file():
        # A VAE-only repo (its config at the root, no pipeline index): use the root, as a local
        # VAE folder is used whatever ``subfolder`` says (and as diffusers loads a VAE repo).
        sub = ""
    if not commit or not _has_vae_files(snapshot / sub if sub else snapshot, variant):
        snapshot = _download(text, pinned, allow_patterns(sub, variant), cache, token, quiet)
    _check_snapshot(snapshot, text, commit or revision or "main", sub, variant)
    return ResolvedSource(folder=snapshot, source_id=text, revision=commit, is_hub=True)

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
line naming the repo and revision. A ``revision`` that is a full commit sha whose snapshot in the
cache already holds every needed file is used without asking the Hub (a commit's files never
change).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .layout import (CONFIG_NAME, FORMAT_PREFIX, MANIFEST_NAME, PROVENANCE_NAME, WEIGHTS_NAME, read_json, weights_in,
                     weights_names)

__all__ = ["HubError", "SourceError", "HubSourceError", "WrongKindError", "UnreadableError", "ResolvedSource",
           "resolve_source", "allow_patterns", "checkpoint_patterns", "looks_like_repo_id", "local_path", "input_exists"]


# Hub repo ids, by huggingface_hub's validate_repo_id: "namespace/name" of letters, digits, '-',
# '_', '.', each part starting and ending with a letter, digit or '_', the name at most 96
# characters; no '--' or '..', no '.git' at the end (looks_like_repo_id).
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/(?=.{{1,96}}\Z){_REPO_PART}\Z")
_COMMIT = re.compile(r"[0-9a-f]{40}\Z")


class HubError(RuntimeError):
    """A source that cannot be resolved (missing folder, Hub / cache failure); one clear message."""


class SourceError(FileNotFoundError):
    """A source that is not a readable diffusers CogVideoX VAE; the message names the path.

    (Defined here so that resolving a source imports nothing heavy; ``cogvae.converter.loading``
    exports the same class.)"""


class HubSourceError(SourceError, HubError):
    """A bad source rather than a Hub failure: a local path problem, an empty ``revision``, a repo of
    the other kind, a checkpoint repo without files its manifest lists. A :class:`HubError`
    (every failure of :func:`resolve_source` is one) and a :class:`SourceError` (bad input: the
    CLI's exit 3, where Hub failures are exit 5)."""


class WrongKindError(HubSourceError):
    """The source is a converted checkpoint where a diffusers VAE was asked for, or the reverse
    (``found``: its kind, ``wanted``: the kind asked for)."""

    def __init__(self, message: str, found: Optional[str] = None, wanted: Optional[str] = None,
                 where: Optional[str] = None):
        super().__init__(message)
        self.found, self.wanted, self.where = found, wanted, where


class UnreadableError(SourceError):
    """A local input the system will not let us look at or read: permission denied, a name longer
    than the file system allows, a loop of symlinks, an I/O error. The message names the path and
    the system's reason (the CLI's exit 3). Not a :class:`HubError`: no Hub was asked."""


def local_path(path: str | os.PathLike) -> Path:
    """A path a user gave (an argument, ``--out``, a ``str`` in Python) as the ``Path`` it names:
    ``~`` and ``~user`` expanded as a shell would (a quoted ``'~/x'``, ``--out=~/x`` and Python
    strings arrive unexpanded). Every input and output path cogvae takes goes through this."""
    return Path(os.path.expanduser(os.fspath(path)))


# What ``not_a_folder`` names as expected, by the inputs a command takes
DIFFUSERS_FOLDER = "a diffusers VAE or pipeline folder"
CHECKPOINT_FOLDER = "a converted cogvae checkpoint"
EITHER_FOLDER = f"{CHECKPOINT_FOLDER}, or {DIFFUSERS_FOLDER}"


def not_a_folder(shown: str | os.PathLike, expected: str) -> str:
    """The message for an input that is there but is not a folder: ``shown`` as the user gave it.
    A file of a model folder (its safetensors, config.json or COMPLETE, which a user may point at
    directly) also names that folder, the input cogvae takes."""
    msg = f"{shown}: not a folder (expected {expected})"
    path = local_path(shown)
    try:
        # The folder the name is in, not the one a symlink points into: in the Hub cache a
        # snapshot's files are links into blobs/, which holds no model folder.
        folder = Path(os.path.abspath(path)).parent
        kind = _folder_kind(folder) if path.is_file() else None
        # Only a folder of a kind the command takes: naming another would send the user on to a
        # second refusal (a checkpoint's file given to convert, say).
        if kind is not None and (kind == expected or expected == EITHER_FOLDER):
            msg += f"; it is a file of the folder {folder}: give that folder"
    except (OSError, RuntimeError):  # a name the system will not look up: the plain message
        pass
    return msg


def _folder_kind(folder: Path) -> str | None:
    """CHECKPOINT_FOLDER, DIFFUSERS_FOLDER or None: the kind of model folder ``folder`` looks like
    (a converted checkpoint also holds a config.json: its manifest, COMPLETE, tells them apart)."""
    if (folder / MANIFEST_NAME).is_file():
        return CHECKPOINT_FOLDER
    if any((folder / name).is_file() for name in (CONFIG_NAME, "model_index.json")):
        return DIFFUSERS_FOLDER
    return None


def unreadable(path: str | os.PathLike, e: OSError, cls: type = UnreadableError) -> SourceError:
    """``e``, met looking at or reading the input ``path``, as one line naming it and the reason."""
    return cls(f"{path}: cannot read: {e.strerror or e}")


def input_exists(path: str | os.PathLike) -> bool:
    """Whether the input ``path`` exists: False when it (or a parent) is not there; a path the system
    cannot look up (a parent without search permission, a name too long, a symlink loop) raises
    :class:`UnreadableError` instead of pathlib's OSError or a misleading "no such file"."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise unreadable(path, e) from None
    return True


KINDS = ("checkpoint", "diffusers")


def _check_kind(found: str, wanted: Optional[str], where: str, *, local: bool = False) -> None:
    """Refuse a source of the other kind (before any weights are fetched)."""
    if wanted is None or found == wanted:
        return
    if found == "checkpoint":
        msg = (f"{where}: a converted cogvae checkpoint, not a diffusers VAE: load it with cogvae.converter.load, or "
               "turn it back into diffusers files with `cogvae export-diffusers`")
    elif local:
        msg = f"{where}: not a converted cogvae checkpoint (no {MANIFEST_NAME} manifest)"
    else:
        msg = f"{where}: a diffusers VAE repo, not a converted cogvae checkpoint"
    raise WrongKindError(msg, found=found, wanted=wanted, where=where)


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
    return "--" not in source and ".." not in source and not source.endswith(".git")


def _looks_local(source: str) -> bool:
    return (
        source.startswith(("./", "../", "/", "~"))
        or source in (".", "..")
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def hub_snapshot_of(path: str | os.PathLike) -> Optional[tuple[str, str, Path]]:
    """``(repo_id, commit, snapshot folder)`` when ``path`` lies in a Hub cache snapshot
    (``.../models--ORG--NAME/snapshots/<commit>[/...]``, the folder ``snapshot_download`` and
    ``hf download`` hand out), else None. Read from the path as given (its files are symlinks into
    ``blobs/``, which names no repo)."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            repo_id = parts[i][len("models--"):].replace("--", "/", 1)  # a repo id holds no '--' itself
            if looks_like_repo_id(repo_id):
                return repo_id, parts[i + 2], Path(*parts[: i + 3])
    return None


def check_read_variant(variant: Optional[str]) -> None:
    """An empty ``variant`` names no file (diffusers would look for ``diffusion_pytorch_model..safetensors``):
    a ValueError, rather than reading the weights without a variant as if it were None."""
    if variant is not None and not str(variant).strip():
        raise ValueError(f"variant {variant!r}: an empty variant names no weights file; pass None (leave "
                         "--variant out) to read the weights without a variant")


def strip_subfolder(subfolder: Optional[str]) -> str:
    """``subfolder`` as the folder path it names: without leading or trailing slashes ('' or None:
    the root). Every use of a subfolder (Hub patterns, local folders) goes through this, so a
    ``..`` that would leave the repo or pipeline folder is refused (ValueError) for all of them,
    as a shard path out of its folder is."""
    sub = subfolder.strip("/") if subfolder else ""
    if ".." in sub.split("/"):
        raise ValueError(f"subfolder {subfolder!r}: name a folder inside the repo or pipeline folder (no '..')")
    return sub


def allow_patterns(subfolder: str = "vae", variant: Optional[str] = None) -> list[str]:
    """The files of one diffusers VAE (in ``subfolder``, or the repo root when empty) to fetch.

    Weights: ``diffusion_pytorch_model[.<variant>].safetensors``, or the sharded form: diffusers
    writes the index as ``diffusion_pytorch_model.safetensors.index[.<variant>].json`` and shards as
    ``diffusion_pytorch_model[.<variant>]-00001-of-0000N.safetensors``; the older index spellings
    (see ``layout.weights_names``) are fetched too.
    """
    sub = strip_subfolder(subfolder)
    prefix = f"{sub}/" if sub else ""
    v = f".{variant}" if variant else ""
    pats = [
        f"{prefix}config.json",
        f"{prefix}{WEIGHTS_NAME}{v}.safetensors",
        f"{prefix}{WEIGHTS_NAME}{v}-*-of-*.safetensors",
        f"{prefix}{WEIGHTS_NAME}.safetensors.index{v}.json",
        f"{prefix}{WEIGHTS_NAME}.safetensors{v}.index.json",
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
        manifest = read_json(snapshot / MANIFEST_NAME)
        formats = [f for f in manifest.get("formats") or [] if f in FORMAT_PREFIX]
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (OSError, ValueError, AttributeError) as e:  # what the repo holds: a bad source, not a Hub failure
        raise HubSourceError(f"{where}: corrupt {MANIFEST_NAME} manifest in the snapshot at {snapshot} ({e})") from None
    if format is not None:
        if format not in FORMAT_PREFIX:
            raise HubSourceError(f"{where}: unknown format {format!r}; use 'orbax' or 'msgpack'")
        if format not in formats:
            raise HubSourceError(f"{where}: the checkpoint holds no {format} parameters "
                                 f"(formats: {', '.join(formats) or 'none'})")
    elif not formats:
        raise HubSourceError(f"{where}: the checkpoint's {MANIFEST_NAME} manifest lists no parameter format")
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
        index = read_json(folder / "model_index.json")
    except (OSError, ValueError):
        return []
    return sorted(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and "AutoencoderKL" in str(v[1]))


def _shards(index: Path) -> Optional[list[str]]:
    """The shard files a sharded index names (None when it cannot be read or names none)."""
    try:
        shards = sorted({str(f) for f in read_json(index)["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return shards or None


def _has_vae_files(vae: Path, variant: Optional[str]) -> bool:
    """``vae`` holds a config and complete weights of ``variant``: the single file, or an index
    and every shard it names."""
    weights = weights_in(vae, variant)
    if weights is None or not (vae / CONFIG_NAME).is_file():
        return False
    if weights.name.endswith(".safetensors"):
        return True
    shards = _shards(weights)
    return shards is not None and all((vae / f).is_file() for f in shards)


OFFLINE = "offline mode is on (HF_HUB_OFFLINE=1)"
NOT_REACHED = "the Hub could not be reached"


def _cached_listing(repo_id: str, commit: Optional[str], cache: str) -> Optional[set[str]]:
    """The paths of the cached tree listing of ``commit`` (huggingface_hub records it whenever the
    Hub answers a ``snapshot_download`` of that commit), or None when none is cached."""
    if not commit or not _COMMIT.match(commit):
        return None
    try:
        from huggingface_hub import get_cached_repo_tree

        return {f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache)}
    except Exception:  # noqa: BLE001 - not cached, unreadable, or an older huggingface_hub
        return None


def _not_asked(listing: Optional[set[str]]) -> Optional[str]:
    """Why the Hub was not asked for a commit's files, where it cannot have been: offline mode, or
    no cached listing of the commit (an answered request records one). None where it may have been
    (or this huggingface_hub keeps no listings, so the cache cannot tell)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return OFFLINE
    try:
        from huggingface_hub import get_cached_repo_tree  # noqa: F401 - listings are recorded
    except ImportError:  # pragma: no cover - older huggingface_hub
        return None
    return NOT_REACHED if listing is None else None


def _check_snapshot(folder: Path, repo_id: str, rev: str, subfolder: str, variant: Optional[str],
                    cache: str) -> None:
    """The snapshot must hold the config and the complete requested weights: the single file, or an
    index and every shard it names. When the Hub cannot be asked, snapshot_download returns a
    cached snapshot without checking which files it holds (unless the commit's tree listing is
    cached): a file missing then is reported as an incomplete cache, with why the Hub was not asked;
    a file the Hub was asked for and the repo lacks, as missing from the repo."""
    vae = folder / subfolder if subfolder else folder
    rel = f"{subfolder}/" if subfolder else ""
    where = f"{repo_id}@{rev}"
    listing = _cached_listing(repo_id, folder.name, cache)
    why = _not_asked(listing)

    def incomplete(path: str) -> Optional[str]:
        """Why the Hub was not asked for ``path`` where the repo has it (its cached listing names
        it) or may have it (no listing); None where the Hub was asked and the repo lacks it."""
        if listing is not None and path in listing:
            return why or NOT_REACHED
        return why if listing is None else None

    if not (vae / CONFIG_NAME).is_file():
        cfg = f"{rel}{CONFIG_NAME}"
        named = pipeline_vaes(folder) if subfolder else []
        reason = incomplete(cfg)
        if reason and (listing is not None or subfolder in named):
            # the repo has it (its listing, or its model_index.json, names it): the cache lacks it
            raise HubError(f"{where}: no {cfg} in the snapshot at {folder}: the cached snapshot is incomplete and "
                           f"{reason}; re-run with network access")
        hint = ""
        if subfolder and not vae.is_dir():
            hint = (f" (its model_index.json names the VAE {', '.join(repr(n) for n in named)}: pass --subfolder "
                    f"{named[0]})" if named else f" (no '{subfolder}/' folder: pass --subfolder '' for a VAE-only repo?)")
        raise HubError(f"{where}: no {cfg} in the snapshot at {folder}{hint}")
    v = f".{variant}" if variant else ""
    weights = weights_in(vae, variant)
    if weights is None:
        found = sorted(p.name for p in vae.glob(f"{WEIGHTS_NAME}*"))
        names = [f"{rel}{n}" for n in weights_names(variant)]
        reason = next((incomplete(n) for n in names if n in listing), None) if listing is not None else why
        msg = (f"{where}: no {rel}{WEIGHTS_NAME}{v}.safetensors (nor a sharded index) in the snapshot at {folder}"
               + (f" (found: {', '.join(found)})" if found else ""))
        variant_hint = "" if variant else "pass --variant (e.g. fp16) if the repo only has variant weights"
        if reason:
            raise HubError(f"{msg}: the cached snapshot is incomplete and {reason}; re-run with network access"
                           + (f" (or {variant_hint})" if variant_hint and listing is None else ""))
        raise HubError(msg + (f"; {variant_hint}" if variant_hint else ""))
    if not weights.name.endswith(".safetensors"):
        shards = _shards(weights)
        missing = [f for f in shards or () if not (vae / f).is_file()]
        reason = incomplete(f"{rel}{missing[0]}") if missing else None
        if reason:
            raise HubError(f"{where}: {len(missing)} of the {len(shards)} shard(s) named in {rel}{weights.name} are "
                           f"not in the snapshot at {folder} (first: {rel}{missing[0]}): the cached snapshot is "
                           f"incomplete and {reason}; re-run with network access")
        # an unreadable index, or shards the repo itself lacks: the reader names the problem


def _error_chain(e: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while e is not None and e not in chain and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _why_unanswered(e: BaseException) -> tuple[str, str]:
    """Why a request fell back to the cache (offline mode, the HTTP status the Hub answered, or no
    connection), and what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    chain = _error_chain(e)
    if constants.is_offline_mode() or any(isinstance(c, OfflineModeIsEnabled) for c in chain):
        return OFFLINE, "re-run with network access"
    for c in chain:
        status = getattr(getattr(c, "response", None), "status_code", None) if isinstance(c, HfHubHTTPError) else None
        if isinstance(status, int):
            if status in (401, 403):
                return (f"the Hub answered HTTP {status} (not authorised)",
                        "log in with `hf auth login` or set HF_TOKEN")
            what = " (rate limited)" if status == 429 else " (a Hub server error)" if status >= 500 else ""
            return f"the Hub answered HTTP {status}{what}", "try again later"
    return "the Hub cannot be reached (no network?)", "re-run with network access"


def _hub_error(e: BaseException, repo_id: str, revision: Optional[str], cache: str) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
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
        why, todo = _why_unanswered(e)
        return HubError(f"{where}: the cached snapshot in {cache} is incomplete and {why}; {todo}")
    if isinstance(e, LocalEntryNotFoundError):
        from huggingface_hub.file_download import repo_folder_name

        why, todo = _why_unanswered(e)
        repo_dir = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
        repo_cached = repo_dir.is_dir()
        if revision and _COMMIT.match(revision) and (repo_dir / "snapshots" / revision).is_dir():
            # The commit is cached, but not every file asked for (hf_hub_download's error, as
            # snapshot_download reports a commit given by its sha).
            return HubError(f"{where}: the cached snapshot in {cache} is incomplete and {why}; {todo}")
        what = (f"revision {rev!r} of {repo_id} is not in the Hub cache {cache}" if repo_cached
                else f"{repo_id} is not in the Hub cache {cache}")
        todo = "download it once with network access" if todo == "re-run with network access" else todo
        return HubError(f"{what} and {why}; {todo}, or pass a local folder")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return HubError(f"{where}: not authorised (HTTP {status}): log in with `hf auth login` or set HF_TOKEN")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return HubError(f"{where}: Hub request failed: {first}")
    if isinstance(e, HFValidationError):
        return HubSourceError(f"{repo_id!r}: not a valid Hub repo id: {str(e).strip().splitlines()[0]}")
    try:
        from httpx2 import TransportError as _Transport  # huggingface_hub's HTTP client
    except ImportError:  # pragma: no cover - older huggingface_hub
        _Transport = ConnectionError
    if isinstance(e, (ConnectionError, TimeoutError, OSError, _Transport)):
        return HubError(f"{where}: cannot reach the Hugging Face Hub and nothing is cached in {cache}: "
                        f"{type(e).__name__}: {e}")
    return HubError(f"{where}: download failed: {type(e).__name__}: {e}")


def _unreachable(repo_id: str, commit: Optional[str], cache: str, token) -> bool:
    """Whether a request pinned to ``commit`` would find the Hub unreachable, asked with one quick
    request first. huggingface_hub asks for a commit's file listing (unless it has one cached)
    with its retrying backoff: about 23 s and eleven warning lines before it falls back to the
    cache when there is no connection, where an unpinned request falls back at once. So a pinned
    request is preceded by a ``repo_info`` (one try), and reads only the cache when that cannot
    connect. Any answer from the Hub, an HTTP error included, leaves the request as it was."""
    from huggingface_hub import constants

    if not commit or not _COMMIT.match(commit) or constants.is_offline_mode() \
            or _cached_listing(repo_id, commit, cache) is not None:
        return False
    try:
        from httpx2 import ConnectError, TimeoutException  # huggingface_hub's HTTP client
    except ImportError:  # pragma: no cover - an older huggingface_hub (requests): keep its behaviour
        return False
    from huggingface_hub import HfApi

    try:
        HfApi(token=token).repo_info(repo_id, revision=commit, repo_type="model")
    except (ConnectError, TimeoutException):
        return True
    except Exception:  # noqa: BLE001 - the Hub answered (or failed otherwise): the request says how
        return False
    return False


def _download(repo_id: str, revision: Optional[str], patterns: list[str], cache: str, token, quiet: bool) -> Path:
    from huggingface_hub import snapshot_download

    kwargs = dict(repo_id=repo_id, repo_type="model", revision=revision, cache_dir=cache,
                  allow_patterns=patterns, library_name="cogvae")
    if token is not None:
        kwargs["token"] = token
    if _unreachable(repo_id, revision, cache, token):
        kwargs["local_files_only"] = True  # what the request would fall back to, without the retries
    if quiet:
        kwargs["tqdm_class"] = _silent_tqdm()
    try:
        return Path(snapshot_download(**kwargs))
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one HubError line
        raise _hub_error(e, repo_id, revision, cache) from e


def _vae_root(snapshot: Path, sub: str) -> str:
    """The subfolder to read: ``sub``, or the root of a VAE-only repo (its config at the root, no
    pipeline index), as a local VAE folder is used whatever ``subfolder`` says (and as diffusers
    loads a VAE repo)."""
    if sub and not (snapshot / sub / CONFIG_NAME).is_file() and (snapshot / CONFIG_NAME).is_file() \
            and not (snapshot / "model_index.json").is_file():
        return ""
    return sub


def _from_cached_commit(repo_id: str, commit: str, cache: str, sub: str, variant: Optional[str],
                        format: Optional[str], also: list[str], kind: Optional[str]) -> Optional[ResolvedSource]:
    """A commit (a full sha) already in the cache with every file needed, without asking the Hub: a
    commit's files never change. None when something needed is not cached (then the Hub is asked).

    A snapshot with the ``COMPLETE`` manifest is a checkpoint (one format's files needed; ``also``
    files the cached tree listing names are needed too, as the Hub would fetch them; without a
    listing the cache cannot tell whether the commit has them, and they are optional). Otherwise a
    diffusers VAE with its config and complete weights of ``variant`` (unless the cached listing
    names a manifest that is not cached: a checkpoint, to be asked for; and without a listing, a
    diffusers snapshot is not refused as the other kind here, the Hub is asked).
    """
    from huggingface_hub.file_download import repo_folder_name

    # the folder snapshot_download would return (it resolves the cache folder)
    repo_dir = Path(cache).expanduser().resolve() / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    where = f"{repo_id}@{commit}"
    listing = _cached_listing(repo_id, commit, cache)
    if (snapshot / MANIFEST_NAME).is_file():
        _check_kind("checkpoint", kind, where)
        fmt, needed = _checkpoint_format(snapshot, where, format)
        needed += [rel for rel in also if listing is not None and rel in listing]
        if any(not (snapshot / rel).is_file() for rel in needed):
            return None
        return ResolvedSource(folder=snapshot, source_id=repo_id, revision=commit, is_hub=True, kind="checkpoint",
                              format=fmt)
    if listing is not None and MANIFEST_NAME in listing:
        return None
    if listing is None and kind == "checkpoint":
        return None  # without a listing the cache cannot tell that no manifest exists: the Hub says
    sub = _vae_root(snapshot, sub)
    if not _has_vae_files(snapshot / sub if sub else snapshot, variant):
        return None
    _check_kind("diffusers", kind, where)
    return ResolvedSource(folder=snapshot, source_id=repo_id, revision=commit, is_hub=True)


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
    kind: Optional[str] = None,
) -> ResolvedSource:
    """A local folder as is, or a Hub repo id (``org/name``) downloaded into the Hub cache.

    The result's ``kind`` says whether it is a diffusers VAE (or pipeline) or a converted cogvae
    checkpoint; ``kind`` ('checkpoint' or 'diffusers'; None: either) refuses a source of the other
    kind (:class:`WrongKindError`), for a Hub repo right after the first request, before any
    weights are fetched. For a diffusers repo only the VAE files are fetched (see
    :func:`allow_patterns`); for a checkpoint repo only one format (``format``, or see
    :func:`_checkpoint_format`). ``revision`` is a branch, tag or commit; the result's ``revision``
    is the resolved commit sha, and both requests read that one commit; a commit sha already
    cached with every needed file is used without asking the Hub. ``quiet`` hides huggingface_hub's
    progress bars. ``cache_dir`` defaults to huggingface_hub's (``HF_HUB_CACHE``). ``also``: more
    files of a checkpoint repo to fetch where the repo has them (``verify`` asks for the diffusers
    copy a ``push --with-diffusers`` adds); they are asked for in the first request (nothing is
    fetched for a file the repo lacks, so no second request is needed for them; a diffusers repo
    holding a file at such a path gets it fetched too). Raises :class:`HubError` with one clear
    line on any failure; a bad source rather than a Hub failure (a local path problem, an empty
    ``revision``, the other kind) is a :class:`HubSourceError`, also a :class:`SourceError`; a
    local path the system will not let us look at (permission denied, a name too long) is an
    :class:`UnreadableError`, a :class:`SourceError` only. ``~`` in ``source`` is expanded.
    """
    if kind not in (None, *KINDS):
        raise ValueError(f"unknown kind {kind!r}; use 'checkpoint' or 'diffusers'")
    check_read_variant(variant)
    text = os.fspath(source)
    if revision is not None and not str(revision).strip():
        raise HubSourceError(f"{text}: the revision is empty (--revision ''): give a branch, tag or commit sha, "
                             "or leave it out")
    path = local_path(text)
    exists = input_exists(path)
    if not exists and os.path.islink(path):  # named, but dangling: a local input, never a Hub repo id
        raise HubSourceError(f"{text} is a broken symlink (to {os.readlink(path)}, which does not exist)")
    if exists:  # a local path that cannot be looked at: UnreadableError, never a Hub request
        if revision is not None:
            raise HubSourceError(f"{text}: --revision applies to Hub repo ids only, not to a local folder")
        if not path.is_dir():
            raise HubSourceError(not_a_folder(text, DIFFUSERS_FOLDER))
        from .checkpoint import looks_like_checkpoint

        found = "checkpoint" if looks_like_checkpoint(path) else "diffusers"
        _check_kind(found, kind, text, local=True)
        return ResolvedSource(folder=path, source_id=text, revision=None, is_hub=False, kind=found)
    if _looks_local(text) or not looks_like_repo_id(text):
        hint = "" if _looks_local(text) else " and not a Hub repo id ('org/name')"
        raise HubSourceError(f"{text}: no such folder{hint}")

    from huggingface_hub import constants

    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    sub = strip_subfolder(subfolder)
    also = list(also) if kind != "diffusers" else []  # files of a checkpoint repo
    if revision is not None and _COMMIT.match(revision):
        cached = _from_cached_commit(text, revision, cache, sub, variant, format, also, kind)
        if cached is not None:
            return cached
    # First request: the few small files that tell a checkpoint repo from a diffusers one, and the
    # ``also`` files (for a repo without them, asking costs nothing).
    probe = [MANIFEST_NAME, CONFIG_NAME, "model_index.json"] + ([f"{sub}/{CONFIG_NAME}"] if sub else [])
    also_missing: Optional[HubError] = None
    try:
        snapshot = _download(text, revision, probe + [f for f in also if f not in probe], cache, token, quiet)
    except HubError as e:
        from huggingface_hub.errors import IncompleteSnapshotError

        if not also or not isinstance(e.__cause__, IncompleteSnapshotError):
            raise
        # The Hub cannot be asked, and the cached listing names files not cached: perhaps only
        # ``also`` files, which a diffusers repo does not need (a checkpoint repo does, below).
        snapshot = _download(text, revision, probe, cache, token, quiet)
        also_missing = e
    commit = snapshot.name if _COMMIT.match(snapshot.name) else None
    # The second request is pinned to the commit just resolved, so a push landing in between
    # cannot mix two commits' files; and as a commit's files never change, it is skipped when the
    # probe's snapshot already holds everything needed (no retries to wait for when the Hub
    # cannot be reached).
    pinned = commit or revision
    where = f"{text}@{commit or revision or 'main'}"
    found = "checkpoint" if (snapshot / MANIFEST_NAME).is_file() else "diffusers"
    _check_kind(found, kind, where)  # before any weights are fetched
    if found == "checkpoint":
        if also_missing is not None:
            raise also_missing
        fmt, needed = _checkpoint_format(snapshot, where, format)

        def missing_files() -> list[str]:
            return [rel for rel in needed if not (snapshot / rel).is_file()]

        if not commit or missing_files():
            snapshot = _download(text, pinned, checkpoint_patterns(fmt) + also, cache, token, quiet)
            if not commit:  # not pinned: the manifest fetched now is the one to follow
                fmt, needed = _checkpoint_format(snapshot, where, fmt)
        missing = missing_files()
        if missing:
            listing = _cached_listing(text, commit, cache)
            if listing is not None and missing[0] not in listing:
                raise HubSourceError(f"{where}: the repo lacks {len(missing)} file(s) its {MANIFEST_NAME} manifest "
                                     f"lists for the {fmt} format (first: {missing[0]}): an incomplete upload?")
            raise HubError(f"{where}: the cached snapshot at {snapshot} lacks {len(missing)} file(s) of the "
                           f"checkpoint's {fmt} format (first: {missing[0]}) and {_not_asked(listing) or NOT_REACHED}; "
                           "re-run with network access")
        return ResolvedSource(folder=snapshot, source_id=text, revision=commit, is_hub=True, kind="checkpoint",
                              format=fmt)
    sub = _vae_root(snapshot, sub)
    if not commit or not _has_vae_files(snapshot / sub if sub else snapshot, variant):
        snapshot = _download(text, pinned, allow_patterns(sub, variant), cache, token, quiet)
    _check_snapshot(snapshot, text, commit or revision or "main", sub, variant, cache)
    return ResolvedSource(folder=snapshot, source_id=text, revision=commit, is_hub=True)

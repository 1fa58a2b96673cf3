"""Verify a converted checkpoint (or a diffusers VAE folder), optionally against a reference.

``verify_checkpoint(source, reference=None)`` never raises for a bad source: every problem
(unreadable files, missing / extra / mis-shaped tensors, non-finite values, disallowed dtypes,
parity failure) becomes a line of the returned :class:`VerifyReport`, whose ``ok`` is False.

Checks:
  * architecture: every parameter key and shape against the abstract model built from the
    checkpoint's own config (``cogvae.model.abstract_model`` + ``nnx.split``), and against the
    reference's keys and shapes when one is given;
  * dtypes per tensor (summarised), and that every value is finite;
  * per-tensor relative change ``||a - b|| / ||b||`` against the reference, most changed first;
  * parity with diffusers (when torch and diffusers are importable): diffusers'
    ``AutoencoderKLCogVideoX`` built from the config in fp32 and given the exported weights, and the
    NNX model, decode the same small latent; rel L2 <= 1e-5 and max abs <= 1e-4.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .layout import DIFFUSERS_WEIGHTS

__all__ = ["VerifyReport", "verify_checkpoint", "PARITY_REL_L2", "PARITY_MAX_ABS"]

PARITY_REL_L2 = 1e-5
PARITY_MAX_ABS = 1e-4
#: the parity latent: (batch, latent frames, height, width); channels come from the config
# The inputs of the parity check (B, T, H, W), small enough for the full-size model on a CPU, long
# enough for diffusers' frame batching: 5 latents decode as an odd first batch of 3 and a batch of
# 2, 17 frames encode as a first batch of 9 and a batch of 8, so both carry conv caches from batch
# to batch, as the compiled path's scan does.
PARITY_LATENT = (1, 5, 4, 4)
PARITY_VIDEO = (1, 17, 32, 32)
_LIST_LIMIT = 50  # lines per section in format_text (to_dict keeps everything)


def _jf(x: Optional[float]) -> Any:
    """A float for JSON: non-finite values as strings ('nan', 'inf')."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _strict_json(obj: Any) -> Any:
    """obj with every float, at any depth, passed through ``_jf``: strict JSON throughout
    (parity cases carry their own rel_l2 / max_abs, which a diverged model makes NaN)."""
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _jf(obj)
    return obj


@dataclass
class _Loaded:
    path: str
    kind: str = "?"  # 'checkpoint' | 'diffusers'
    config: Any = None  # VAEConfig
    params: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    detail: str = ""
    diffusers_copy: Optional[Path] = None  # a checkpoint's weights also in diffusers' format (push --with-diffusers)
    # other diffusers weights files beside a checkpoint (an index, shards, a variant, a .bin): no
    # cogvae push leaves them, and from_pretrained may read them instead of (or without) the copy
    foreign_diffusers: list[str] = field(default_factory=list)
    unreachable: Optional[Exception] = None  # not found / not fetched: the CLI's exit 3 or 5, not a failed check
    # parameters whose tensors the files name but cannot give (a missing shard, a broken header
    # entry): their file's problem says so, so they are not also "missing"
    unreadable: set[str] = field(default_factory=set)


@dataclass
class VerifyReport:
    """Everything ``verify_checkpoint`` found; ``ok`` is True only when no check failed."""

    source: str
    source_kind: str
    reference: Optional[str] = None
    reference_kind: Optional[str] = None
    source_detail: str = ""
    reference_detail: str = ""
    load_problems: list[str] = field(default_factory=list)
    num_tensors: int = 0
    num_parameters: int = 0
    model_missing: list[dict] = field(default_factory=list)  # {key, shape}
    model_extra: list[dict] = field(default_factory=list)  # {key, shape}
    model_shape_mismatch: list[dict] = field(default_factory=list)  # {key, shape, expected}
    reference_missing: list[dict] = field(default_factory=list)  # in reference, not in source
    reference_extra: list[dict] = field(default_factory=list)  # in source, not in reference
    reference_shape_mismatch: list[dict] = field(default_factory=list)
    config_differences: list[dict] = field(default_factory=list)  # {key, source, reference}
    dtypes: dict[str, str] = field(default_factory=dict)
    bad_dtypes: list[dict] = field(default_factory=list)  # {key, dtype}
    nonfinite: list[dict] = field(default_factory=list)  # {key, nan, inf, size}
    changes: list[dict] = field(default_factory=list)  # {key, rel_change, max_abs}, most changed first
    max_rel_change: Optional[float] = None
    max_abs_change: Optional[float] = None
    over_tolerance: list[str] = field(default_factory=list)
    parity: dict = field(default_factory=dict)  # {status: passed|failed|skipped, ...}
    diffusers_copy: dict = field(default_factory=dict)  # {file, status: identical|differs|skipped, ...}
    top: int = 10
    source_loaded: bool = True
    reference_loaded: bool = True
    #: the source or reference could not be found or fetched (SourceError / HubError): for the
    #: command line an input or network error (exit 3 or 5), not a failed verification
    input_errors: list = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ verdict
    @property
    def problems(self) -> list[str]:
        """One line per failed check (empty when ok)."""
        out = list(self.load_problems)
        out += [f"missing tensor {m['key']!r} (model expects shape {tuple(m['shape'])})" for m in self.model_missing]
        out += [f"extra tensor {m['key']!r} (shape {tuple(m['shape'])}) is not a parameter of the model"
                for m in self.model_extra]
        out += [f"tensor {m['key']!r} has shape {tuple(m['shape'])}, model expects {tuple(m['expected'])}"
                for m in self.model_shape_mismatch]
        out += [f"tensor {m['key']!r} of the reference is missing" for m in self.reference_missing]
        out += [f"tensor {m['key']!r} is not in the reference" for m in self.reference_extra]
        out += [f"tensor {m['key']!r} has shape {tuple(m['shape'])}, reference has {tuple(m['expected'])}"
                for m in self.reference_shape_mismatch]
        out += [f"config {d['key']!r} differs: {d['source']!r} vs reference {d['reference']!r}"
                for d in self.config_differences]
        out += [f"tensor {d['key']!r} has dtype {d['dtype']} (allowed: float32, float16, bfloat16)"
                for d in self.bad_dtypes]
        out += [f"tensor {d['key']!r} has non-finite values: {d['nan']} NaN, {d['inf']} Inf (of {d['size']})"
                for d in self.nonfinite]
        out += [f"tensor {k!r} changed by more than {self._tolerance()}" + self._why_unbounded(k)
                for k in self.over_tolerance]
        if self.parity.get("status") == "failed":
            out.append(f"parity with diffusers failed: {self.parity.get('reason', '')}".rstrip(": "))
        if self.diffusers_copy.get("status") == "differs":
            out.append(f"the diffusers copy {self.diffusers_copy['file']} is not the checkpoint's weights: "
                       + self.diffusers_copy["reason"])
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def dtype_summary(self) -> dict[str, int]:
        return dict(sorted(Counter(self.dtypes.values()).items()))

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        """JSON-serialisable (strict JSON: non-finite floats are strings, at any depth)."""
        return _strict_json({
            "ok": self.ok,
            "problems": self.problems,
            "source": {"path": self.source, "kind": self.source_kind, "detail": self.source_detail},
            "reference": None if self.reference is None else
            {"path": self.reference, "kind": self.reference_kind, "detail": self.reference_detail},
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "architecture": {
                "missing": self.model_missing,
                "extra": self.model_extra,
                "shape_mismatch": self.model_shape_mismatch,
            },
            "reference_architecture": None if self.reference is None or not (self.source_loaded and self.reference_loaded) else {
                "missing": self.reference_missing,
                "extra": self.reference_extra,
                "shape_mismatch": self.reference_shape_mismatch,
                "config_differences": self.config_differences,
            },
            "dtypes": {"summary": self.dtype_summary(), "per_tensor": dict(self.dtypes), "disallowed": self.bad_dtypes},
            "nonfinite": self.nonfinite,
            "changes": None if self.reference is None else
            [{"key": c["key"], "rel_change": c["rel_change"], "max_abs": c["max_abs"]} for c in self.changes],
            "max_rel_change": self.max_rel_change,
            "max_abs_change": self.max_abs_change,
            "parity": self.parity,
            "diffusers_copy": self.diffusers_copy or None,
        })

    def _tolerance(self) -> str:
        """The gate in words: a tensor fails when it changed by more than both bounds given."""
        parts = ([f"{self.max_rel_change:g} relative to the reference"] if self.max_rel_change is not None else []) \
            + ([f"{self.max_abs_change:g} in absolute value"] if self.max_abs_change is not None else [])
        return " and by more than ".join(parts)

    def _why_unbounded(self, key: str) -> str:
        """For a tensor whose relative change is not a finite number, why (else nothing)."""
        c = next((c for c in self.changes if c["key"] == key), None)
        if c is None or math.isfinite(c["rel_change"]):
            return ""
        if math.isnan(c["rel_change"]):
            return " (non-finite values)"
        if self.max_rel_change is None:  # the gate is the absolute bound alone: the relative change is not why
            return ""
        return " (all zero in the reference: any change is infinitely large relative to it)"

    def format_text(self) -> str:
        L: list[str] = []
        add = L.append

        def listing(items: list[str]) -> None:
            for s in items[:_LIST_LIMIT]:
                add("    " + s.replace("\n", "\n    "))  # a multi-line problem stays indented
            if len(items) > _LIST_LIMIT:
                add(f"    ... and {len(items) - _LIST_LIMIT} more (see --json)")

        add(f"source:    {self.source} ({self.source_kind}{', ' + self.source_detail if self.source_detail else ''})")
        if self.reference is not None:
            add(f"reference: {self.reference} ({self.reference_kind}"
                f"{', ' + self.reference_detail if self.reference_detail else ''})")
        if self.load_problems:
            add(f"load: FAILED ({len(self.load_problems)} problem(s))")
            listing(self.load_problems)
        arch = len(self.model_missing) + len(self.model_extra) + len(self.model_shape_mismatch)
        if self.num_tensors or arch:
            add(f"architecture: {'FAILED' if arch else 'ok'}: {self.num_tensors} tensors, "
                f"{self.num_parameters:,} parameters"
                + (f"; {len(self.model_missing)} missing, {len(self.model_extra)} extra, "
                   f"{len(self.model_shape_mismatch)} wrong shape" if arch else
                   "; every key and shape matches the model for this config"))
            listing([f"missing: {m['key']} {tuple(m['shape'])}" for m in self.model_missing]
                    + [f"extra: {m['key']} {tuple(m['shape'])}" for m in self.model_extra]
                    + [f"shape: {m['key']} {tuple(m['shape'])}, expected {tuple(m['expected'])}"
                       for m in self.model_shape_mismatch])
        if self.reference is not None and not (self.source_loaded and self.reference_loaded):
            add("vs reference: not compared ("
                + ("the reference" if self.source_loaded else "the source") + " could not be loaded)")
        elif self.reference is not None:
            ref = (len(self.reference_missing) + len(self.reference_extra) + len(self.reference_shape_mismatch)
                   + len(self.config_differences))
            add(f"vs reference: {'FAILED' if ref else 'ok'}"
                + (": keys, shapes and config match" if not ref else
                   f": {len(self.reference_missing)} missing, {len(self.reference_extra)} extra, "
                   f"{len(self.reference_shape_mismatch)} wrong shape, {len(self.config_differences)} config difference(s)"))
            listing([f"missing: {m['key']} {tuple(m['shape'])}" for m in self.reference_missing]
                    + [f"extra: {m['key']} {tuple(m['shape'])}" for m in self.reference_extra]
                    + [f"shape: {m['key']} {tuple(m['shape'])}, reference {tuple(m['expected'])}"
                       for m in self.reference_shape_mismatch]
                    + [f"config: {d['key']}: {d['source']!r} vs {d['reference']!r}" for d in self.config_differences])
        if self.dtypes:
            summary = ", ".join(f"{k} x{v}" for k, v in self.dtype_summary().items())
            add(f"dtypes: {'FAILED' if self.bad_dtypes else 'ok'}: {summary}")
            listing([f"{d['key']}: {d['dtype']}" for d in self.bad_dtypes])
            add(f"finite: {'FAILED' if self.nonfinite else 'ok'}"
                + (f": {len(self.nonfinite)} tensor(s) with NaN/Inf" if self.nonfinite else ": every value is finite"))
            listing([f"{d['key']}: {d['nan']} NaN, {d['inf']} Inf (of {d['size']})" for d in self.nonfinite])
        if self.reference is not None and self.changes:
            worst = self.changes[0]
            n = min(self.top, len(self.changes))
            rel, ab = self.max_rel_change, self.max_abs_change
            tol = ("" if rel is None and ab is None else f", tolerance max abs {ab:g}" if rel is None
                   else f", tolerance {rel:g}" + (f" (or max abs {ab:g})" if ab is not None else ""))
            add(f"relative change vs reference{tol}: max {_fmt(worst['rel_change'])} ({worst['key']}); "
                f"top {n} of {len(self.changes)}:")
            for c in self.changes[:n]:
                add(f"    {_fmt(c['rel_change']):>10}  max abs {_fmt(c['max_abs']):>10}  {c['key']}")
            if self.over_tolerance:  # the gate's verdict, tensor by tensor (the top list may hold fewer)
                by_key = {c["key"]: c for c in self.changes}
                add(f"changed by more than {self._tolerance()}: FAILED: {len(self.over_tolerance)} tensor(s)")
                listing([f"{_fmt(by_key[k]['rel_change']):>10}  max abs {_fmt(by_key[k]['max_abs']):>10}  {k}"
                         + self._why_unbounded(k) for k in self.over_tolerance])
        p = self.parity
        if p:
            if p["status"] == "skipped":
                add(f"parity: {p['note']}")
            elif p.get("cases"):
                add(f"parity vs diffusers (fp32, compiled; bounds rel L2 <= {PARITY_REL_L2:g}, max abs <= "
                    f"{PARITY_MAX_ABS:g}): {p['status'].upper()}")
                for c in p["cases"]:
                    what = "latents" if c["op"] == "decode" else "video"
                    detail = (f"rel L2 {_fmt(c['rel_l2'])}, max abs {_fmt(c['max_abs'])}" if "rel_l2" in c
                              else c.get("reason", ""))
                    add(f"    {c['op']} of {what} {tuple(c['input_shape'])}: {c['status'].upper()}: {detail}")
            else:
                add(f"parity vs diffusers: {p['status'].upper()}: {p.get('reason', '')}")
        d = self.diffusers_copy
        if d:
            add(f"diffusers copy ({Path(d['file']).name}): " + (
                f"identical to the checkpoint ({d['num_tensors']} tensors, bit for bit)" if d["status"] == "identical"
                else f"{d['status'].upper()}: {d.get('reason', '')}"))
        add(f"RESULT: {'OK' if self.ok else 'FAILED'}" + ("" if self.ok else f" ({len(self.problems)} problem(s))"))
        return "\n".join(L)


def _fmt(x: float) -> str:
    return f"{x:.3e}" if math.isfinite(x) else str(x)


# ----------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------


def _lenient_convert(tensors: Any, mapping: Any) -> dict[str, np.ndarray]:
    """Map every tensor that maps to exactly one rule, keeping bad shapes and values for the report
    (the strict engine already said what is wrong; this lets the remaining checks run)."""
    from .engine import _to_numpy
    from .transforms import TransformError

    out: dict[str, np.ndarray] = {}
    for key in tensors.keys():
        matches = mapping.match_forward(key)
        if len(matches) != 1:
            continue  # already reported by the engine (unmatched / ambiguous)
        tpath, rule = matches[0]
        arr = _to_numpy(tensors[key])
        try:
            out[tpath] = rule.transform(arr)
        except (TransformError, ValueError):
            out[tpath] = arr  # wrong rank: keep it as is; its shape is reported
    return out


def _load(source: str | os.PathLike, *, options: tuple[str, str, str] = ("--subfolder", "--variant", "--revision"),
          **kwargs: Any) -> _Loaded:
    """:func:`_load_side`, its hints naming this side's options: the loaders' messages say "pass
    --subfolder" or "pass --variant" (and name an empty "--revision ''"), which for the reference
    are --reference-subfolder, --reference-variant and --reference-revision (--variant there would
    change the source)."""
    import copy
    import re

    got = _load_side(source, options=options, **kwargs)

    def renamed(text: str) -> str:
        for plain, own in zip(("--subfolder", "--variant"), options[:2]):
            text = re.sub(rf"\bpass {plain}\b", f"pass {own}", text)
        return text.replace("(--revision '')", f"({options[2]} '')")  # resolve_source's empty revision

    got.problems = [renamed(p) for p in got.problems]
    if got.unreachable is not None and renamed(str(got.unreachable)) != str(got.unreachable):
        e = copy.copy(got.unreachable)
        e.args = (renamed(str(got.unreachable)),)
        got.unreachable = e
    return got


def _load_side(source: str | os.PathLike, *, fmt: Optional[str], subfolder: str, variant: Optional[str],
               mapping: Any, revision: Optional[str] = None, token: Optional[str] = None,
               options: tuple[str, str, str] = ("--subfolder", "--variant", "--revision"),
               diffusers_copy: bool = True) -> _Loaded:
    """One side of the report. ``options``: the command-line names of ``subfolder``, ``variant``
    and ``revision`` for this side, named when one is given where it does not apply (subfolder
    and variant to a converted checkpoint: refused, never silently ignored; a revision to a local
    folder). ``diffusers_copy``: also fetch a Hub checkpoint's diffusers copy (the source's, which
    is compared; never the reference's)."""
    from .checkpoint import (CheckpointError, FormatNotHeldError, ReplacedWhileReadingError, _identity, check_files,
                             looks_like_checkpoint, read_checkpoint)
    from .hub import EITHER_FOLDER, UnreadableError, input_exists, local_path, not_a_folder, strip_subfolder
    from .loading import SourceError
    from .loading import not_for_checkpoint as refusal

    text = os.fspath(source)
    got = _Loaded(path=text)
    given = [name for name, value in zip(options[:2], (subfolder, variant)) if value is not None and
             (name == options[1] or strip_subfolder(value) not in ("", "vae"))]

    def not_for_checkpoint(where: str) -> _Loaded:
        return unreachable(SourceError(refusal(where, given)))

    def unreachable(e: SourceError) -> _Loaded:
        """Nothing to verify (not found, not a folder, unreadable): the CLI's exit 3 (or a Hub
        failure's 5), not a failed check."""
        got.problems.append(str(e))
        got.unreachable = e
        return got

    path = local_path(text)
    hub_listing: set[str] = set()
    try:
        exists = input_exists(path)
    except UnreadableError as e:
        return unreachable(e)
    if exists and revision is not None:
        return unreachable(SourceError(f"{text}: {options[2]} applies to Hub repo ids only, not to a local folder"))
    if not exists:
        from .hub import HubError, WrongKindError, looks_like_repo_id, resolve_source

        if not looks_like_repo_id(text):
            return unreachable(SourceError(f"{text}: no such file or folder"))
        try:
            # The diffusers copy is asked for in the first request, before the repo's kind is
            # known; with a variant the source must be diffusers weights (a VAE-only repo's root
            # weights are then not the ones asked for), so it is not asked for.
            also = [DIFFUSERS_WEIGHTS] if diffusers_copy and variant is None else []
            # with a diffusers-only option, a checkpoint repo is refused after the first, small
            # request, before its parameters are fetched
            r = resolve_source(text, subfolder=subfolder, variant=variant, format=fmt, revision=revision,
                               token=token, quiet=True, also=also, kind="diffusers" if given else None)
        except WrongKindError as e:
            if e.found == "checkpoint":
                return not_for_checkpoint(e.where or text)
            got.problems.append(str(e))
            got.unreachable = e
            return got
        except HubError as e:
            got.problems.append(str(e))
            got.unreachable = e  # as cogvae-convert: a bad source 3, the Hub 5
            return got
        path = Path(r.folder)
        fmt = r.format or fmt
        got.detail = f"Hub snapshot {r.revision}"
        from huggingface_hub import constants

        from .hub import _cached_listing

        # the repo's files at that commit (the snapshot holds only those fetched), where recorded
        hub_listing = _cached_listing(text, r.revision, constants.HF_HUB_CACHE) or set()
    elif not path.is_dir():
        return unreachable(SourceError(not_a_folder(text, EITHER_FOLDER)))

    def replaced() -> _Loaded:
        got.config, got.params = None, {}
        return unreachable(SourceError(f"{text}: replaced while it was being verified (a conversion or "
                                       "save with --overwrite?); verify it again when that is done"))

    if looks_like_checkpoint(path):
        got.kind = "converted checkpoint"
        if given:
            return not_for_checkpoint(text)
        try:
            local = not got.detail
            before = _identity(path)
            if local:  # a local folder holds every format: all its files must be sound, not only the
                # ones read (a Hub download fetches one format, checked as it is read); hashed once
                check_files(path)
            got.config, got.params, info = read_checkpoint(path, format=fmt, verify=not local)
            if _identity(path) != before:  # hashed one checkpoint, read another (a concurrent --overwrite)
                return replaced()
        except UnreadableError as e:  # permission denied: an input problem, not a corrupt checkpoint
            return unreachable(e)
        except FormatNotHeldError as e:  # --format names a format it lacks: the option, not the checkpoint
            return unreachable(SourceError(str(e)))
        except CheckpointError as e:
            # a file gone or changed because the whole checkpoint was replaced meanwhile is not a
            # corrupt checkpoint: an input to verify again (exit 3), not a failed check (exit 1)
            if isinstance(e, ReplacedWhileReadingError) or _identity(path) != before:
                return replaced()
            got.problems.append(str(e))
            return got
        got.detail = (got.detail + ", " if got.detail else "") + f"{info['format']} format"
        if diffusers_copy and (path / DIFFUSERS_WEIGHTS).is_file():
            got.diffusers_copy = path / DIFFUSERS_WEIGHTS
        if diffusers_copy:
            from .layout import weights_variant

            try:
                here = {p.name for p in path.iterdir()}
            except OSError:
                here = set()
            got.foreign_diffusers = sorted(n for n in here | {p for p in hub_listing if "/" not in p}
                                           if n != DIFFUSERS_WEIGHTS and weights_variant(n)[0])
        return got

    from cogvae.model import ConfigError, VAEConfig

    from .engine import ConversionError, convert_flat, path_to_str
    from .loading import SourceError, find_diffusers_vae
    from .st_io import SafetensorsError, open_safetensors

    got.kind = "diffusers folder"
    try:
        src = find_diffusers_vae(path, subfolder=subfolder, variant=variant)
    except SourceError as e:  # neither a checkpoint nor a diffusers VAE: nothing to verify (exit 3, as convert)
        return unreachable(e)
    try:
        got.detail = (got.detail + ", " if got.detail else "") + src.weights_path.name
        _check_readable([src.config_path, src.weights_path])  # before they are parsed: not a failed check
        _check_readable(src.weight_files[1:])  # the shards of an index
        # an unknown config key is a problem, but the weights are still checked against the rest
        got.config, config_error = VAEConfig.from_json_file_ignoring_unknown(src.config_path)
        if config_error is not None:
            got.problems.append(str(config_error))
        # opened despite problems with the files (a missing shard, ...): convert_flat names them
        # first, and every readable tensor is still checked
        tensors = open_safetensors(src.weights_path, strict=False)
    except UnreadableError as e:
        return unreachable(e)
    except (SourceError, ConfigError, SafetensorsError) as e:
        got.problems.append(str(e))
        return got
    from cogvae.model import abstract_model
    from flax import nnx

    _, abstract_state = nnx.split(abstract_model(got.config))
    try:
        flat = convert_flat(tensors, abstract_state, mapping, source_name=str(src.weights_path))
        got.params = {path_to_str(k): v for k, v in flat.items()}
    except ConversionError as e:
        # Shape, NaN and missing-key problems are reported again (per tensor) by the checks below;
        # the rest (unmatched, ambiguous, duplicate keys) only here.
        got.problems.extend(p for p in e.problems if _engine_only(p))
        got.params = _lenient_convert(tensors, mapping)
    got.unreadable = {m[0][0] for m in map(mapping.match_forward, tensors.unreadable) if len(m) == 1}
    return got


def _check_readable(paths: list[Path]) -> None:
    """Open each file (a real open, as the readers will): one the system will not let us read
    raises ``hub.UnreadableError`` naming it, so that verify reports an input problem (exit 3)
    rather than a safetensors or config file that failed its checks (a missing shard is left to the
    safetensors reader, which names it)."""
    from .hub import unreadable

    for p in paths:
        try:
            with open(p, "rb"):
                pass
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as e:
            raise unreadable(p, e) from None


def _compare_diffusers_copy(params: dict[str, np.ndarray], copy: Path, mapping: Any) -> dict:
    """Is ``copy`` (a checkpoint's weights in diffusers' format) exactly what exporting the
    checkpoint gives: the same keys, and every tensor's dtype, shape and bytes?"""
    from .engine import ConversionError, export_tensors
    from .st_io import SafetensorsError, open_safetensors

    out: dict[str, Any] = {"file": str(copy)}
    try:
        ours = export_tensors(params, mapping, source_name="<checkpoint>", lazy=True)
        theirs = open_safetensors(copy)
        their_keys = set(theirs.keys())
    except (ConversionError, SafetensorsError, OSError) as e:
        return {**out, "status": "differs", "reason": f"cannot compare: {e}"}
    missing, extra = sorted(set(ours) - their_keys), sorted(their_keys - set(ours))
    differs = []
    for k in sorted(set(ours) & their_keys):
        a, b = ours[k], theirs[k]
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            differs.append(k)
    out.update(num_tensors=len(their_keys), missing=missing, extra=extra, differs=differs)
    if not (missing or extra or differs):
        return {**out, "status": "identical"}
    parts = ([f"{len(differs)} tensor(s) differ (first: {differs[0]!r})"] if differs else []) \
        + ([f"{len(missing)} missing (first: {missing[0]!r})"] if missing else []) \
        + ([f"{len(extra)} extra (first: {extra[0]!r})"] if extra else [])
    return {**out, "status": "differs", "reason": "; ".join(parts)}


def _engine_only(problem: str) -> bool:
    """Engine problems that the per-tensor checks do not report themselves."""
    return not any(s in problem for s in ("shape mismatch", "non-finite", "missing tensor for model parameter",
                                          "extra tensor: maps to", "not allowed", "not floating point"))


# ----------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------


def _compare_keys(params: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]):
    missing = [{"key": k, "shape": list(s)} for k, s in sorted(expected.items()) if k not in params]
    extra = [{"key": k, "shape": list(params[k].shape)} for k in sorted(params) if k not in expected]
    wrong = [{"key": k, "shape": list(params[k].shape), "expected": list(expected[k])}
             for k in sorted(params) if k in expected and tuple(params[k].shape) != tuple(expected[k])]
    return missing, extra, wrong


def _as_float(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _value_checks(params: dict[str, np.ndarray]) -> tuple[list[dict], list[dict]]:
    """Per tensor, in key order: the dtypes cogvae does not store ({key, dtype}) and the
    non-finite values ({key, nan, inf, size})."""
    from .engine import ALLOWED_DTYPES

    bad = [{"key": k, "dtype": params[k].dtype.name} for k in sorted(params)
           if params[k].dtype.name not in ALLOWED_DTYPES]
    return bad, [nf for nf in (_nonfinite(k, params[k]) for k in sorted(params)) if nf]


def _nonfinite(key: str, a: np.ndarray) -> Optional[dict]:
    if a.dtype.kind not in "fc" and a.dtype.name != "bfloat16":
        return None
    x = np.asarray(a, dtype=np.float32) if a.dtype.name == "bfloat16" else a
    finite = np.isfinite(x)
    if finite.all():
        return None
    nan = int(np.count_nonzero(np.isnan(x)))
    return {"key": key, "nan": nan, "inf": int(x.size - np.count_nonzero(finite) - nan), "size": int(x.size)}


def _change(key: str, a: np.ndarray, b: np.ndarray) -> dict:
    a64, b64 = _as_float(a), _as_float(b)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = a64 - b64
        num = float(np.linalg.norm(diff)) if diff.size else 0.0
        den = float(np.linalg.norm(b64)) if b64.size else 0.0
        mx = float(np.abs(diff).max()) if diff.size else 0.0
    if math.isnan(num) or math.isnan(den):
        rel = float("nan")
    elif den == 0.0:
        rel = 0.0 if num == 0.0 else float("inf")
    else:
        rel = num / den
    return {"key": key, "rel_change": rel, "max_abs": mx}


def _change_order(c: dict) -> tuple:
    r = c["rel_change"]
    return (0 if math.isnan(r) else 1, -r if not math.isnan(r) else 0.0, c["key"])


def _import_reference():
    """torch and diffusers' AutoencoderKLCogVideoX, or None when either is not installed."""
    try:
        import torch
        from diffusers import AutoencoderKLCogVideoX
    except ImportError:
        return None
    return torch, AutoencoderKLCogVideoX


def _parity(config: Any, params: dict[str, np.ndarray], mapping: Any, seed: int = 0) -> dict:
    ref = _import_reference()
    if ref is None:
        return {"status": "skipped", "note": "parity check skipped: torch/diffusers not installed"}
    torch, DiffusersVAE = ref
    import jax.numpy as jnp

    from .checkpoint import params_to_model
    from .engine import ConversionError, export_tensors

    fp32 = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    try:
        exported = export_tensors(fp32, mapping, source_name="<checkpoint>")
    except ConversionError as e:
        return {"status": "failed", "reason": f"cannot export to diffusers names: {e.problems[0]}"}
    # Built on torch's meta device: its random init (0.9 GB and about 1 s for the full-size
    # model) would only be overwritten; load_state_dict(assign=True) gives it the real tensors.
    with torch.device("meta"):
        model = DiffusersVAE.from_config(config.to_diffusers_config()).eval()  # fp32 parameters
    # The exported arrays are fresh, contiguous fp32 copies nobody else holds: torch shares them
    # (from_numpy) and the model takes them over (assign=True) instead of copying them again.
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in exported.items()}
    del exported
    result = model.load_state_dict(state, strict=False, assign=True)
    del state
    # anything still on the meta device was never given a tensor (a missing key, by another name)
    missing = list(dict.fromkeys([*result.missing_keys, *(n for n, t in [*model.named_parameters(),
                                                                          *model.named_buffers()] if t.is_meta)]))
    if missing or result.unexpected_keys:
        what = [f"missing {k!r}" for k in missing[:3]] + [f"unexpected {k!r}" for k in result.unexpected_keys[:3]]
        return {"status": "failed", "reason": "diffusers rejects the exported weights: " + ", ".join(what)}
    ours = params_to_model(config, dict(fp32), compute_dtype=jnp.float32, source_name="<checkpoint>")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((*PARITY_LATENT, config.latent_channels)).astype(np.float32)
    video = rng.uniform(-1, 1, (*PARITY_VIDEO, config.in_channels)).astype(np.float32)

    def to_torch(a: np.ndarray):  # (B, T, H, W, C) -> (B, C, T, H, W)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 4, 1, 2, 3)))

    # What users run: the compiled encode and decode (first batch, then the scan over the rest).
    # A model that cannot encode (diffusers' encode fails on it too) is checked on decode alone.
    no_encode = config.encode_problem
    ops = [("decode", z)] + ([] if no_encode else [("encode", video)])
    with torch.no_grad():
        want = {"decode": model.decode(to_torch(z)).sample.numpy()}
        got = {"decode": np.asarray(ours.decode(jnp.asarray(z))).transpose(0, 4, 1, 2, 3)}
        if not no_encode:
            dist = model.encode(to_torch(video)).latent_dist
            want["encode"] = torch.cat([dist.mean, dist.logvar], dim=1).numpy()
            mean, logvar = ours.encode(jnp.asarray(video))
            got["encode"] = np.concatenate([np.asarray(mean), np.asarray(logvar)], axis=-1).transpose(0, 4, 1, 2, 3)
    cases = []
    for op, x in ops:
        case = {"op": op, "input_shape": list(x.shape), "output_shape": list(got[op].shape)}
        if got[op].shape != want[op].shape:
            cases.append({**case, "status": "failed", "reason": f"output shape {got[op].shape} != diffusers "
                                                                 f"{want[op].shape}"})
            continue
        a, b = got[op].astype(np.float64), want[op].astype(np.float64)
        rel = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))
        mx = float(np.abs(a - b).max())
        ok = math.isfinite(rel) and rel <= PARITY_REL_L2 and mx <= PARITY_MAX_ABS
        cases.append({**case, "rel_l2": rel, "max_abs": mx, "status": "passed" if ok else "failed"})
    if no_encode:
        cases.append({"op": "encode", "input_shape": list(video.shape), "status": "skipped", "reason": no_encode})
    failed = [c for c in cases if c["status"] == "failed"]
    out = {"status": "failed" if failed else "passed", "cases": cases}
    measured = [c for c in cases if "rel_l2" in c]
    if measured:
        out["rel_l2"] = max(c["rel_l2"] for c in measured)
        out["max_abs"] = max(c["max_abs"] for c in measured)
    if failed:
        out["reason"] = "; ".join(
            f"{c['op']}: " + (c.get("reason") or f"rel L2 {_fmt(c['rel_l2'])} (<= {PARITY_REL_L2:g}), "
                                                  f"max abs {_fmt(c['max_abs'])} (<= {PARITY_MAX_ABS:g})")
            for c in failed)
    return out


# ----------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------


def verify_checkpoint(
    source: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    *,
    parity: bool = True,
    format: Optional[str] = None,
    subfolder: str = "vae",
    variant: Optional[str] = None,
    reference_variant: Optional[str] = None,
    reference_subfolder: str = "vae",
    reference_revision: Optional[str] = None,
    top: int = 10,
    max_rel_change: Optional[float] = None,
    max_abs_change: Optional[float] = None,
    mapping: Any = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> VerifyReport:
    """Check ``source`` (a converted checkpoint folder in either format, a diffusers VAE or pipeline
    folder, or a Hub repo id of either) and, when given, compare it with ``reference`` (same kinds).

    ``format`` picks the checkpoint format to read ('orbax' / 'msgpack'; default: what is there).
    ``subfolder`` and ``variant`` are the VAE subfolder and weights variant of a diffusers
    ``source``, ``reference_subfolder`` and ``reference_variant`` those of a diffusers
    ``reference`` (defaults: ``vae``, the main weights), so an fp16 variant can be checked against
    the fp32 weights of the same folder; given for a converted checkpoint (other than the default
    subfolder), they are an input error, as in ``load``.
    ``top``: changed tensors listed by ``format_text`` (``to_dict`` lists all). ``max_rel_change``:
    when set, a tensor whose relative change exceeds it fails the report (default: report only);
    with ``max_abs_change`` too, only one whose largest absolute change also exceeds that (as
    ``numpy.allclose``: a tensor all zero in the reference, infinitely changed relative to it once
    it moves, passes when it moved by little); ``max_abs_change`` alone gates on that only.
    The parity check runs ``source``'s own weights through diffusers and through the NNX model
    (fp32; the compiled decode of 5 latents and encode of 17 frames, over two frame batches each)
    and compares the outputs; ``parity=False`` skips it. ``revision`` (branch, tag or commit)
    applies to a Hub ``source``, ``reference_revision`` to a Hub ``reference`` (e.g. the commit a
    fine-tune's base was at, which its model card names); ``token`` to every Hub request.
    """
    from .checkpoint import keep_heap_lean
    from .mapping import load_mapping

    if reference is None:  # options for a reference that is not there would be silently ignored
        given = [name for name, value in (("reference_variant", reference_variant),
                                          ("reference_revision", reference_revision)) if value is not None]
        if reference_subfolder != "vae":
            given.insert(0, "reference_subfolder")
        if given:
            raise ValueError(f"{', '.join(given)} given without a reference")
    for name, bound in (("max_rel_change", max_rel_change), ("max_abs_change", max_abs_change)):
        if bound is None:
            continue
        if reference is None:  # a gate with nothing to compare with would always pass
            raise ValueError(f"{name} needs a reference to compare with")
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not math.isfinite(bound) or bound < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {bound!r}")
    keep_heap_lean()  # freed tensors go back to the OS between phases (see keep_heap_lean)
    mapping = mapping or load_mapping()
    src = _load(source, fmt=format, subfolder=subfolder, variant=variant, mapping=mapping, revision=revision,
                token=token)
    report = VerifyReport(source=src.path, source_kind=src.kind, source_detail=src.detail, top=top,
                          max_rel_change=max_rel_change, max_abs_change=max_abs_change,
                          load_problems=list(src.problems),
                          source_loaded=src.config is not None and bool(src.params))
    if src.unreachable is not None:
        report.input_errors.append(src.unreachable)
    params = src.params
    report.num_tensors = len(params)
    report.num_parameters = int(sum(int(np.prod(a.shape, dtype=np.int64)) for a in params.values()))

    if src.config is not None:
        from .engine import expected_shapes

        expected = expected_shapes(src.config)
        report.model_missing, report.model_extra, report.model_shape_mismatch = _compare_keys(params, expected)
        report.model_missing = [m for m in report.model_missing if m["key"] not in src.unreadable]

    from .engine import ALLOWED_DTYPES

    report.dtypes = {k: params[k].dtype.name for k in sorted(params)}
    report.bad_dtypes, report.nonfinite = _value_checks(params)

    if reference is not None:
        ref = _load(reference, fmt=None, subfolder=reference_subfolder, variant=reference_variant, mapping=mapping,
                    revision=reference_revision, token=token,
                    options=("--reference-subfolder", "--reference-variant", "--reference-revision"),
                    diffusers_copy=False)
        report.reference, report.reference_kind, report.reference_detail = ref.path, ref.kind, ref.detail
        report.load_problems += [f"reference: {p}" for p in ref.problems]
        # The source's dtypes and values are checked per tensor above; the reference's are checked
        # here, since _load leaves those problems to the per-tensor checks: a comparison with a
        # reference holding NaN, or integer tensors, would otherwise pass (every change NaN or inf).
        bad, nonfinite = _value_checks(ref.params)
        report.load_problems += [f"reference: tensor {b['key']!r}: dtype {b['dtype']} not allowed (allowed: "
                                 f"{', '.join(sorted(ALLOWED_DTYPES))})" for b in bad]
        report.load_problems += [f"reference: tensor {n['key']!r}: {n['nan']} NaN and {n['inf']} inf of {n['size']} "
                                 "values" for n in nonfinite]
        report.reference_loaded = ref.config is not None and bool(ref.params)
        if ref.unreachable is not None:
            report.input_errors.append(type(ref.unreachable)(f"reference: {ref.unreachable}"))
        if ref.config is not None and src.config is not None:
            # the settings only: which diffusers version wrote each config is not a difference
            report.config_differences = [{"key": k, "source": src.config[k], "reference": ref.config[k]}
                                         for k in sorted(src.config.differences(ref.config))]
        if ref.params and params:
            ref_shapes = {k: tuple(v.shape) for k, v in ref.params.items()}
            report.reference_missing, report.reference_extra, report.reference_shape_mismatch = _compare_keys(
                params, ref_shapes)
            # a tensor one side could not read is named by that side's file problem, not again here
            report.reference_missing = [m for m in report.reference_missing if m["key"] not in src.unreadable]
            report.reference_extra = [m for m in report.reference_extra if m["key"] not in ref.unreadable]
            report.changes = sorted(
                (_change(k, params[k], ref.params[k]) for k in sorted(params)
                 if k in ref.params and tuple(params[k].shape) == tuple(ref.params[k].shape)),
                key=_change_order)
            if max_rel_change is not None or max_abs_change is not None:
                # as numpy's allclose: within either bound given passes (NaN passes neither)
                report.over_tolerance = [
                    c["key"] for c in report.changes
                    if (max_rel_change is None or not c["rel_change"] <= max_rel_change)
                    and (max_abs_change is None or not c["max_abs"] <= max_abs_change)]
        del ref  # the reference's weights are not needed for the parity run

    unfit = []  # why the parameters cannot run through both models (each named in the report above)
    if src.config is None or not params or src.problems:
        unfit.append("the source has load problems")
    arch = len(report.model_missing) + len(report.model_extra) + len(report.model_shape_mismatch)
    if arch:
        unfit.append(f"{arch} tensor(s) missing, extra or of the wrong shape for the model")
    if report.nonfinite:
        unfit.append(f"{len(report.nonfinite)} tensor(s) with NaN/Inf")
    if report.bad_dtypes:
        unfit.append(f"{len(report.bad_dtypes)} tensor(s) of a dtype the model does not take")
    fits = not unfit
    if not parity:
        report.parity = {"status": "skipped", "note": "parity check not requested"}
    else:
        if fits:
            try:
                report.parity = _parity(src.config, params, mapping)
            except Exception as e:  # noqa: BLE001 - a crash of the reference run is a failed check
                if isinstance(e, AssertionError):
                    raise
                report.parity = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        elif not report.source_loaded:
            report.parity = {"status": "skipped", "note": "parity check skipped: the source could not be loaded"}
        else:
            report.parity = {"status": "skipped", "note": "parity check skipped: " + "; ".join(unfit)}
    if src.diffusers_copy is not None:  # e.g. a repo pushed with --with-diffusers: both halves must agree
        if fits:
            report.diffusers_copy = _compare_diffusers_copy(params, src.diffusers_copy, mapping)
        else:
            report.diffusers_copy = {"file": str(src.diffusers_copy), "status": "skipped",
                                     "reason": "; ".join(unfit)}
    if src.foreign_diffusers:  # weights diffusers may load beside (or instead of) the copy: never the export
        names = src.foreign_diffusers
        foreign = (f"{len(names)} other diffusers weights file(s) beside the checkpoint: {', '.join(names)} "
                   "(not written by cogvae: from_pretrained reads an index before the single file, and a "
                   "variant or .bin when asked for one); push again with --with-diffusers, or remove them")
        d = report.diffusers_copy or {"file": names[0]}
        reason = "; ".join(r for r in (d.get("reason") if d.get("status") == "differs" else None, foreign) if r)
        report.diffusers_copy = {**d, "status": "differs", "reason": reason, "foreign": names}
    return report

"""Command line: ``cogvae-convert`` and ``cogvae {convert,export-diffusers,verify,push,inspect}``.

Every failure is reported as one ``Error: ...`` line on stderr (a multi-problem conversion error
adds one line per problem) with a documented exit code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click

from .interrupts import Terminated  # (also cli.Terminated)

__all__ = ["cli", "convert_command", "EXIT_CODES"]

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT, EXIT_NETWORK = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a command stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: a CI timeout, `docker stop`, `kill`
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_VALIDATION: "validation or verification failed",
    EXIT_USAGE: "usage error (bad option or argument)",
    EXIT_INPUT: "bad source or input: not found, unreadable, not a CogVideoX VAE, bad safetensors, "
                "config/weights mismatch",
    EXIT_OUTPUT: "output problem: exists without --overwrite, not writable",
    EXIT_NETWORK: "network / Hugging Face Hub error",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C / SIGINT); an unfinished output is removed",
    EXIT_TERMINATED: "terminated (SIGTERM: a CI timeout, docker stop, kill); cleaned up as for Ctrl-C",
}
EXIT_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())


def _exit_code(e: BaseException) -> Optional[int]:
    from cogvae.model import ConfigError

    from .checkpoint import CheckpointError, OutputError
    from .convert import ValidationError
    from .engine import ConversionError
    from .loading import SourceError
    from .mapping import MappingError
    from .st_io import SafetensorsError

    if isinstance(e, ValidationError):
        return EXIT_VALIDATION
    if isinstance(e, OutputError):
        return EXIT_OUTPUT
    if isinstance(e, (SourceError, SafetensorsError, ConfigError, ConversionError, CheckpointError, MappingError)):
        return EXIT_INPUT
    try:
        from .hub import HubError

        if isinstance(e, HubError):
            return EXIT_NETWORK
    except ImportError:
        pass
    try:
        from .push import PushError, PushInputError, PushUsageError

        if isinstance(e, PushUsageError):  # a malformed repo id: the caller's argument, refused before any work
            return EXIT_USAGE
        if isinstance(e, PushInputError):  # the local folder: missing, unreadable, not a complete checkpoint
            return EXIT_INPUT
        if isinstance(e, PushError):
            return EXIT_NETWORK
    except ImportError:
        pass
    return None


def _fail(e: BaseException) -> None:
    code = _exit_code(e)
    if code is None:
        raise e
    msg = str(e).strip() or type(e).__name__
    if code == EXIT_USAGE:  # an argument refused by the API (a malformed repo id): click's usage line too, as
        # for any other usage error (exit 2 either way)
        raise click.UsageError(msg, ctx=click.get_current_context(silent=True)) from None
    click.echo(f"Error: {msg}", err=True)
    sys.exit(code)


def _run(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- mapped to one line + exit code, or re-raised
        _fail(e)


# In a console script (not in-process, as under click's CliRunner): the real stderr while an
# interrupt's cleanup runs with stderr muted (see _on_signal), else None.
_CONSOLE_SCRIPT = False
_muted_stderr: Optional[int] = None


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM and SIGINT: noted (``interrupts``: an exception raised where CPython discards it
    is honoured later), then raised where the command is, so that its cleanup runs. In a console
    script stderr is muted until the command's one ``Error:`` line: an interrupted Orbax write or
    read makes tensorstore's threads print a traceback per chunk in flight ("Event loop is
    closed"), hundreds of lines around the one that matters."""
    import signal

    from . import interrupts

    global _muted_stderr
    interrupts.note(signum)
    if _CONSOLE_SCRIPT and _muted_stderr is None:
        with contextlib.suppress(OSError):
            sys.stderr.flush()
            saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            _muted_stderr = saved
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _unmute_stderr() -> None:
    global _muted_stderr
    if _muted_stderr is not None:
        with contextlib.suppress(OSError):
            os.dup2(_muted_stderr, 2)
            os.close(_muted_stderr)
        _muted_stderr = None


class _Interruptible:
    """A click command whose Ctrl-C (KeyboardInterrupt, once the command's own cleanup has run)
    ends with one ``Error: interrupted`` line and exit 130, not click's "Aborted!" and exit 1
    (documented as a failed validation); SIGTERM likewise, with ``Error: terminated`` and 143."""

    def invoke(self, ctx: click.Context) -> Any:
        import signal
        import threading

        from . import interrupts

        previous = {}
        if threading.current_thread() is threading.main_thread():
            interrupts.reset()
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    previous[signum] = signal.signal(signum, _on_signal)
                except (ValueError, OSError):  # pragma: no cover - no signals here (an embedding host)
                    pass
        try:
            result = super().invoke(ctx)
            interrupts.check()  # one raised where CPython discarded it: the command must not end as a success
            return result
        except KeyboardInterrupt as e:  # (its message, when there is one, says what was kept)
            _unmute_stderr()
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            with contextlib.suppress(OSError, ValueError):  # a closed stderr: the exit code says it
                click.echo(f"Error: {what}" + (f": {e.args[0]}" if e.args and e.args[0] else ""), err=True)
            ctx.exit(EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED)
        finally:
            _unmute_stderr()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if previous:
                interrupts.reset()  # what was noted belonged to this command (a later call from Python must not see it)


class _Command(_Interruptible, click.Command):
    pass


class _Group(_Interruptible, click.Group):
    pass


def _output_path(out: str | os.PathLike) -> Path:
    """``--out`` as the folder it names: ``~`` expanded (``--out=~/x`` and a quoted '~/x' reach us
    unexpanded), refused as an output problem (exit 4) when the system cannot even look it up: a
    parent without search permission, a name longer than the file system allows, a symlink loop."""
    from .checkpoint import OutputError
    from .hub import local_path

    path = local_path(out)
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # not there yet (a file among its parents is named by the writer)
    except OSError as e:
        raise OutputError(f"{out}: cannot write: {e.strerror or e}") from None
    return path


_stdout_gone = False


def _out(text: str) -> None:
    """One line of a command's output on stdout. A reader that went away (``| head -1``: EPIPE)
    ends the output, not the command, whose exit code still says how it went (click would exit 1,
    which means a failed validation); stdout is then pointed at /dev/null so that nothing more,
    nor the interpreter's last flush, fails on it. Any other failure to write is exit 4."""
    global _stdout_gone
    if _stdout_gone:
        return
    try:
        click.echo(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    except (OSError, ValueError) as e:
        from .checkpoint import OutputError

        _fail(OutputError(f"cannot write to stdout: {getattr(e, 'strerror', None) or e}"))


def _emit_json(data: Any) -> None:
    """Strict JSON on stdout: a non-finite float anywhere becomes a string ('nan', 'inf'), so
    ``jq`` or ``JSON.parse`` can read the report of a diverged model too. Written as ``_out``
    writes (a full disk is exit 4)."""
    from .verify import _strict_json

    _out(json.dumps(_strict_json(data), indent=2, default=str, allow_nan=False))


def _push_lines(result: dict, *, revision: Optional[str] = None, create_pr: bool = False) -> list[str]:
    """What a push did (or, a dry run, would do), as text: a dry run lists every file with its size
    and the total; a real push gives the commit (or pull request) URL and what it removed."""
    files = result.get("files") or []
    total = sum(int(f.get("size") or 0) for f in files)
    target = str(result.get("repo_id"))
    if create_pr:
        target += f" as a pull request (base: {revision or 'main'})"
    elif revision:
        target += f" (branch {revision})"
    if result.get("dry_run"):
        from .checkpoint import human_size

        width = len(f"{total:,}")  # the widest number
        lines = [f"would upload {len(files)} file(s), {human_size(total)}, to {target}:"]
        lines += [f"  {int(f.get('size') or 0):>{width},}  {f.get('path')}" for f in files]
        lines.append(f"  {total:>{width},}  bytes in all")
        lines.append("dry run: nothing uploaded (the repo was not read, so the files of a previous checkpoint "
                     "that a push would remove are not listed)")
        return lines
    deleted = result.get("deleted") or []
    return [f"uploaded {len(files)} file(s) to {target}"
            + (f", removed {len(deleted)} file(s) of the previous checkpoint" if deleted else "")
            + (f": {result.get('url')}" if result.get("url") else "")]


# ----------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------

CONVERT_HELP = """Convert a diffusers CogVideoX VAE into a verified cogvae (JAX/Flax NNX) checkpoint.

SOURCE is a Hugging Face Hub repo id (a pipeline repo, its VAE is read from --subfolder), a local
pipeline folder (with vae/) or a VAE folder. Without SOURCE the tiny CogVideoX VAE shipped with
cogvae is converted (no network needed).

The output folder holds orbax/ and/or params.msgpack, config.json, provenance.json and a COMPLETE
manifest. It is written to a temporary sibling and renamed into place at the end, so an
interrupted conversion leaves nothing behind that loads. By default the written checkpoint is
loaded back in every format and a small latent is decoded (--no-validate skips this).

\b
Examples:
  cogvae-convert --out ckpt/
  cogvae-convert THUDM/CogVideoX-2b --out ckpt/
  cogvae-convert THUDM/CogVideoX-5b --revision main --dtype bfloat16 --out ckpt-5b/
  cogvae-convert ./CogVideoX-2b/vae --format msgpack --out ckpt/ --overwrite --json
  cogvae-convert THUDM/CogVideoX-2b --out ckpt/ --push-to-hub me/cogvideox-2b-vae-jax --private
  cogvae-convert THUDM/CogVideoX-2b --out ckpt/ --push-to-hub me/vae-jax --push-revision bf16 --dtype bfloat16
"""


def _subfolder(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """A --subfolder / --reference-subfolder that leaves the repo or pipeline folder is a usage error."""
    from .hub import strip_subfolder

    try:
        strip_subfolder(value)
    except ValueError:
        raise click.BadParameter("name a folder inside the repo or pipeline folder (no '..')") from None
    return value


def _read_variant(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """An empty --variant / --reference-variant names no file (diffusers would look for
    ``diffusion_pytorch_model..safetensors``): a usage error, as for export-diffusers --variant."""
    from .hub import check_read_variant  # the rule every reader applies, as a usage error here

    try:
        check_read_variant(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _convert_options(f):
    opts = [
        click.argument("source", required=False),
        click.option("--out", "out", type=click.Path(path_type=Path), default=Path("ckpt"), show_default=True,
                     help="Output checkpoint folder."),
        click.option("--subfolder", default="vae", show_default=True, callback=_subfolder,
                     help="VAE subfolder of a pipeline repo/folder ('' for a bare VAE repo)."),
        click.option("--revision", default=None, help="Hub branch, tag or commit (Hub sources only)."),
        click.option("--variant", default=None, callback=_read_variant,
                     help="Weights variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Store parameters in this dtype (default: keep the source dtype)."),
        click.option("--format", "fmt", type=click.Choice(["orbax", "msgpack", "both"]), default="both",
                     show_default=True, help="Checkpoint format(s) to write."),
        click.option("--no-validate", is_flag=True, help="Skip loading the result back and the smoke decode."),
        click.option("--overwrite", is_flag=True,
                     help="Replace an earlier checkpoint (or an empty folder) at --out, atomically; any other "
                          "folder is refused."),
        click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None,
                     help="Upload the finished checkpoint to this Hub model repo."),
        click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
        click.option("--push-revision", default=None, metavar="BRANCH", callback=lambda c, p, v: _branch(v),
                     help="With --push-to-hub: the branch to push to (--revision names the source's revision)."),
        click.option("--create-pr", is_flag=True, help="With --push-to-hub: open a pull request instead of committing."),
        click.option("--dry-run", is_flag=True, help="With --push-to-hub: list what would be uploaded, upload nothing."),
        click.option("--token", default=None, help="Hub token for the source and the push (default: HF_TOKEN / login)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _do_convert(source, out, subfolder, revision, variant, dtype, fmt, no_validate, overwrite, push_to_hub,
                private, push_revision, create_pr, dry_run, token, quiet, as_json):
    from .convert import convert

    if source is None and revision is not None:  # checked here: the embedded default has no revisions
        raise click.UsageError("--revision needs a Hub SOURCE (the embedded default VAE has no revisions)")
    if push_to_hub is None and (private or create_pr or dry_run or push_revision):
        raise click.UsageError("--private, --push-revision, --create-pr and --dry-run need --push-to-hub")
    out = _run(_output_path, out)
    try:
        summary = convert(
            source, out, subfolder=subfolder, revision=revision, variant=variant, dtype=dtype,
            formats=fmt, validate=not no_validate, overwrite=overwrite, quiet=quiet,
            push_to_hub=push_to_hub, private=private, push_revision=push_revision, create_pr=create_pr,
            dry_run=dry_run, token=token,
        )
    except Exception as e:  # noqa: BLE001 -- mapped to one line + exit code, or re-raised
        if as_json and getattr(e, "summary", None) is not None:  # converted, push failed: the summary still
            _emit_json(e.summary)
        _fail(e)
    if as_json:
        _emit_json(summary)
        return
    if not quiet:
        _out(str(out))
    if summary.get("push"):  # a result, not progress: shown with --quiet too
        for line in _push_lines(summary["push"], revision=push_revision, create_pr=create_pr):
            _out(line)


@click.command("cogvae-convert", cls=_Command, help=CONVERT_HELP, epilog=EXIT_EPILOG,
               context_settings={"help_option_names": ["-h", "--help"]})
@_convert_options
def convert_command(**kw):
    _do_convert(**kw)


@click.group(cls=_Group, epilog=EXIT_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cogvae")
def cli():
    """cogvae: CogVideoX VAE checkpoints for JAX/Flax NNX.

    \b
    Examples:
      cogvae convert THUDM/CogVideoX-2b --out ckpt/
      cogvae inspect ckpt/
      cogvae verify ckpt/ --reference THUDM/CogVideoX-2b
      cogvae export-diffusers ckpt/ --out vae-diffusers/
      cogvae push ckpt/ me/cogvideox-2b-vae-jax --dry-run
    """


@cli.command("convert", help=CONVERT_HELP.replace("cogvae-convert", "cogvae convert"), epilog=EXIT_EPILOG)
@_convert_options
def convert_subcommand(**kw):
    _do_convert(**kw)


# ----------------------------------------------------------------------------------------
# export-diffusers
# ----------------------------------------------------------------------------------------


def export_diffusers(*args: Any, **kwargs: Any) -> dict:
    """``cogvae.converter.saving.export_diffusers`` (imported on first use, like jax and flax)."""
    from .saving import export_diffusers as export

    return export(*args, **kwargs)


@cli.command("export-diffusers", epilog=EXIT_EPILOG)
@click.argument("ckpt")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output diffusers VAE folder.")
@click.option("--format", "fmt", type=click.Choice(["orbax", "msgpack"]), default=None,
              help="Which stored format to read (default: orbax when present).")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub CKPT only).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN / login).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Write the weights in this dtype (default: keep the checkpoint's); a weight that "
                   "would overflow to Inf is refused.")
@click.option("--variant", default=None,
              help="Weights variant, as diffusers' save_pretrained(variant=) names it: fp16 writes "
                   "diffusion_pytorch_model.fp16.safetensors.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier diffusers export (a folder of config.json and diffusion_pytorch_model "
                   "files only, or an empty one) at --out, atomically; any other folder is refused.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def export_diffusers_command(ckpt, out, fmt, revision, token, dtype, variant, overwrite, as_json):
    """Export a converted checkpoint (a folder, or the Hub repo id of one pushed by `cogvae push`)
    back to diffusers format (config.json + diffusion_pytorch_model.safetensors), through the
    inverse mapping rules. The tensors are bit-identical to the ones converted (unless --dtype
    casts them); diffusers' AutoencoderKLCogVideoX.from_pretrained loads it.

    \b
    Examples:
      cogvae export-diffusers ckpt/ --out vae-diffusers/
      cogvae export-diffusers ckpt/ --format msgpack --out vae-diffusers/ --overwrite
      cogvae export-diffusers ckpt-ft/ --dtype float16 --variant fp16 --out vae-diffusers/
      cogvae export-diffusers me/cogvideox-2b-vae-jax --out vae-diffusers/
    """
    from .layout import VARIANT_NAME, VARIANT_RULE

    if variant is not None and not VARIANT_NAME.fullmatch(variant):
        raise click.BadParameter(VARIANT_RULE, param_hint="--variant")
    out = _run(_output_path, out)
    summary = _run(export_diffusers, ckpt, out, format=fmt, overwrite=overwrite, revision=revision, token=token,
                   dtype=dtype, variant=variant)
    if as_json:
        _emit_json(summary)
        return
    _out(str(out))
    if summary.get("kept"):  # the README's fp16-next-to-fp32 layout, or weights of an earlier model left stale
        with contextlib.suppress(OSError):  # a note; stdout keeps only the folder, for scripts
            click.echo(f"kept: {', '.join(summary['kept'])} (weights of other variants, already in {out}; "
                       "not written by this export)", err=True)


# ----------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------


def inspect_source(source: str | Path, *, subfolder: str = "vae", variant: Optional[str] = None, mapping=None,
                   revision: Optional[str] = None, token: Optional[str] = None) -> dict:
    """Per tensor: its rule, target (or source) key, shape and dtype, for a diffusers folder or a
    checkpoint, local or a Hub repo id (only the VAE's files, or one format, are fetched).

    ``problems``: for a diffusers source, every reason ``cogvae-convert`` would refuse its tensors
    without reading their values (a key no rule matches, a tensor of the wrong rank or of another
    shape than the config's architecture, one the architecture lacks, one it needs that the file
    lacks). A checkpoint with such problems is refused by ``read_checkpoint`` before listing."""
    from .checkpoint import looks_like_checkpoint, read_checkpoint
    from .hub import local_path
    from .loading import fetch, find_diffusers_vae, refuse_a_file
    from .mapping import load_mapping
    from .st_io import open_safetensors
    from .transforms import TransformError

    from .hub import WrongKindError, strip_subfolder
    from .loading import SourceError
    from .loading import not_for_checkpoint as refusal

    mapping = mapping or load_mapping()
    rows, problems = [], []
    given = (["--subfolder"] if strip_subfolder(subfolder) not in ("", "vae") else []) + \
        (["--variant"] if variant is not None else [])

    def not_for_checkpoint(where: Any) -> SourceError:
        return SourceError(refusal(where, given))

    try:  # with such an option, a checkpoint repo is refused before its parameters are fetched
        hub = fetch(source, subfolder=subfolder, variant=variant, revision=revision, token=token, quiet=True,
                    kind="diffusers" if given else None)
    except WrongKindError as e:
        if e.found == "checkpoint":
            raise not_for_checkpoint(e.where or source) from None
        raise
    source = hub.folder if hub is not None else local_path(source)
    if hub is None:
        refuse_a_file(source, bool(given))
    if looks_like_checkpoint(source):
        if given:
            raise not_for_checkpoint(source)
        # shapes and dtypes from the format's metadata, and the files' sizes against the manifest:
        # no tensor bytes are read (their hashes and values are verify's)
        config, params, info = read_checkpoint(source, format=hub.format if hub is not None else None,
                                               verify=False, values=False)
        # read_checkpoint checks the files against the manifest, not the weights against the
        # config: a config.json edited to another architecture (and the manifest redone) is what
        # load and export-diffusers refuse, tensor by tensor, so inspect reports it the same way
        from .engine import architecture_problems, expected_shapes

        problems += architecture_problems({k: tuple(a.shape) for k, a in params.items()}, expected_shapes(config),
                                          f"{info['path']} ({info['format']})")
        for path in sorted(params):
            a = params[path]
            m = mapping.match_reverse(path)
            rows.append({"key": path, "rule": m[0][1].label if len(m) == 1 else None,
                         "diffusers_key": m[0][0] if len(m) == 1 else None,
                         "shape": list(a.shape), "dtype": a.dtype.name})
        kind, where = "cogvae-checkpoint", str(source)
    else:
        src = find_diffusers_vae(source, subfolder=subfolder, variant=variant)
        from cogvae.model import VAEConfig

        from .engine import dtype_problem, expected_shapes

        # an unknown config key is one more problem; the tensors are still listed against the rest
        config, config_error = VAEConfig.from_json_file_ignoring_unknown(src.config_path)
        problems += [f"{src.config_path}: {p}" for p in getattr(config_error, "problems", None) or []]
        # opened despite problems with the files (a missing shard, a broken header entry): those
        # are problems too, and every readable tensor is still listed and checked
        tensors = open_safetensors(src.weights_path, strict=False)
        problems += tensors.problems
        file_of = getattr(tensors, "file_of", lambda _k: src.weights_path)
        # What the config's architecture needs (shapes only, no weights): a listed tensor of
        # another shape, and a needed tensor the file lacks, are problems as cogvae-convert sees them.
        needed = expected_shapes(config)
        seen = set()
        for key in sorted(set(tensors.keys()) | set(tensors.unreadable)):
            a = tensors[key] if key not in tensors.unreadable else None
            m = mapping.match_forward(key)
            rule = m[0][1] if len(m) == 1 else None
            row = {"key": key, "rule": rule.label if rule else None, "target": m[0][0] if rule else None,
                   "shape": None if a is None else list(a.shape), "target_shape": None,
                   "dtype": None if a is None else a.dtype.name, "file": str(file_of(key))}
            if a is None:  # named in the file's problems above; it still counts as present
                if rule is not None:
                    seen.add(row["target"])
                row["problem"] = "cannot be read (see the problems of its file)"
            elif rule is None:
                row["problem"] = ("no mapping rule matches this key" if not m else
                                  f"{len(m)} mapping rules match this key")
            else:
                seen.add(row["target"])
                try:
                    row["target_shape"] = list(rule.transform.shape(a.shape))
                except TransformError as e:  # listed, not fatal: inspect shows what the file holds
                    row["problem"] = str(e)
                else:
                    want = needed.get(row["target"])
                    if want is None:
                        row["problem"] = "not a parameter of the config's architecture"
                    elif tuple(row["target_shape"]) != tuple(want):
                        # in the file's layout, as cogvae-convert says it (the model's is in brackets)
                        row["problem"] = (f"shape mismatch: source shape {tuple(a.shape)}, expected "
                                          f"{tuple(rule.inverse_transform.shape(tuple(want)))} (model parameter "
                                          f"{row['target']!r} has shape {tuple(want)})")
            if "problem" not in row and dtype_problem(a.dtype):  # in the header: refused as cogvae-convert does
                row["problem"] = dtype_problem(a.dtype) + (
                    "; cogvae-convert --dtype float32 casts it" if a.dtype.name == "float64" else "")
            if "problem" in row and a is not None:  # an unreadable tensor is named by its file's problem
                problems.append(f"{row['file']}: tensor {key!r}: {row['problem']}")
            rows.append(row)
        missing = sorted(set(needed) - seen)
        for k in missing:
            m = mapping.match_reverse(k)
            hint = f" (expected source key {m[0][0]!r})" if len(m) == 1 else ""
            problems.append(f"{src.weights_path}: missing tensor for model parameter {k!r} {tuple(needed[k])}{hint}")
        kind, where = "diffusers", str(src.weights_path)
    return {"kind": kind, "path": where, "config": config.to_diffusers_config(), "num_tensors": len(rows),
            "tensors": rows, "problems": problems}


@cli.command("inspect", epilog=EXIT_EPILOG)
@click.argument("source")
@click.option("--subfolder", default="vae", show_default=True, callback=_subfolder,
              help="VAE subfolder of a pipeline folder or repo.")
@click.option("--variant", default=None, callback=_read_variant, help="Weights variant of a diffusers folder.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub SOURCE only).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN / login).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def inspect_command(source, subfolder, variant, revision, token, as_json):
    """List every tensor of a diffusers VAE or a converted checkpoint (a folder or a Hub repo id):
    the mapping rule that handles it, where it goes (or comes from), shape and dtype. Exit code 3,
    after the whole listing, when cogvae-convert would refuse the tensors (a broken file, no rule,
    wrong rank, shape or dtype, not in the config's architecture, or missing), each named with its
    file on stderr. Only headers and metadata are read (a checkpoint's files are checked against
    its manifest by size): hashes and values (NaN, Inf) are checked by convert and verify.

    \b
    Examples:
      cogvae inspect ./CogVideoX-2b/vae
      cogvae inspect ckpt/ --json
      cogvae inspect THUDM/CogVideoX-2b
    """
    data = _run(inspect_source, source, subfolder=subfolder, variant=variant, revision=revision, token=token)
    if as_json:
        _emit_json(data)
    else:
        _out(f"{data['kind']}: {data['path']} ({data['num_tensors']} tensors)")
        for r in data["tensors"]:
            other = r.get("target") or r.get("diffusers_key") or "-"
            problem = f"  PROBLEM: {r['problem']}" if r.get("problem") else ""
            what = f"{tuple(r['shape'])} {r['dtype']}" if r["shape"] is not None else "(unreadable)"
            _out(f"{r['key']}  ->  {other}  [{r['rule'] or 'NO RULE'}]  {what}{problem}")
    if data["problems"]:  # the listing is complete; the exit code says cogvae-convert would refuse this source
        n = len(data["problems"])
        click.echo(f"Error: {data['path']}: {n} problem(s) that cogvae-convert would refuse:", err=True)
        for p in data["problems"]:
            click.echo(f"  - {p}", err=True)
        sys.exit(EXIT_INPUT)


# ----------------------------------------------------------------------------------------
# verify / push (thin wrappers)
# ----------------------------------------------------------------------------------------


@cli.command("verify", epilog=EXIT_EPILOG)
@click.argument("source")
@click.option("--reference", default=None,
              help="What SOURCE's weights are compared with, tensor by tensor: a diffusers VAE or a converted "
                   "checkpoint (folder or Hub repo id), e.g. the base of a fine-tune.")
@click.option("--no-parity", is_flag=True,
              help="Skip the parity check (SOURCE's own weights run through diffusers and through the NNX "
                   "model, outputs compared).")
@click.option("--max-rel-change", type=float, default=None, metavar="X",
              help="Fail when a tensor's relative change (L2 of the change / L2 of the reference tensor) "
                   "against --reference exceeds X (default: report only). A tensor that is all zeros in the "
                   "reference counts as infinitely changed once it moves.")
@click.option("--max-abs-change", type=float, default=None, metavar="Y",
              help="With --max-rel-change: a tensor beyond X still passes when no value of it changed by more "
                   "than Y (as numpy.allclose; e.g. biases all zero in the reference). Alone: fail when a "
                   "tensor's largest absolute change exceeds Y.")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Changed tensors listed in the text report (--json lists all).")
@click.option("--format", "fmt", type=click.Choice(["orbax", "msgpack"]), default=None,
              help="Which stored format of a checkpoint SOURCE to read (default: orbax when present).")
@click.option("--subfolder", default="vae", show_default=True, callback=_subfolder,
              help="VAE subfolder of a diffusers pipeline SOURCE.")
@click.option("--variant", default=None, callback=_read_variant, help="Weights variant of a diffusers SOURCE, e.g. fp16.")
@click.option("--revision", default=None, help="Hub branch, tag or commit of SOURCE (Hub SOURCE only).")
@click.option("--reference-subfolder", default="vae", show_default=True, callback=_subfolder,
              help="VAE subfolder of a diffusers pipeline --reference.")
@click.option("--reference-variant", default=None, callback=_read_variant,
              help="Weights variant of a diffusers --reference, e.g. fp16.")
@click.option("--reference-revision", default=None,
              help="Hub branch, tag or commit of --reference (Hub --reference only), e.g. the commit a "
                   "fine-tune's base was at.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN / login).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def verify_command(source, reference, no_parity, max_rel_change, max_abs_change, top, fmt, subfolder, variant,
                   revision, reference_subfolder, reference_variant, reference_revision, token, as_json):
    """Verify a converted checkpoint (a folder, or the Hub repo id of one pushed by `cogvae push`)
    or a diffusers VAE: manifest and hashes, loading, the architecture, dtypes and finite values,
    and parity (its own weights give the same outputs in diffusers and in the NNX model). With
    --reference, also how much each tensor changed against it (a gate with --max-rel-change).
    Exit code 1 when a check fails.

    \b
    Examples:
      cogvae verify ckpt/
      cogvae verify ckpt/ --reference THUDM/CogVideoX-2b --json
      cogvae verify me/cogvideox-2b-vae-jax --revision finetune-v2 --reference THUDM/CogVideoX-2b
      cogvae verify ckpt-tuned/ --reference ckpt/ --max-rel-change 0.05
      cogvae verify me/vae-ft --reference me/vae-jax --reference-revision v1 --max-rel-change 0.05
    """
    from .verify import verify_checkpoint

    if reference is None:
        given = [name for name, value in (("--reference-variant", reference_variant),
                                          ("--reference-revision", reference_revision)) if value is not None]
        if reference_subfolder != "vae":
            given.insert(0, "--reference-subfolder")
        if given:
            raise click.UsageError(f"{', '.join(given)} given without --reference")
    for option, bound in (("--max-rel-change", max_rel_change), ("--max-abs-change", max_abs_change)):
        if bound is None:
            continue
        if reference is None:
            raise click.UsageError(f"{option} needs --reference (the gate compares each tensor with it)")
        if not math.isfinite(bound) or bound < 0:
            raise click.BadParameter(f"must be a finite number >= 0, got {bound!r}", param_hint=f"'{option}'")
    report = _run(verify_checkpoint, source, reference, parity=not no_parity, revision=revision, token=token,
                  max_rel_change=max_rel_change, max_abs_change=max_abs_change, top=top, format=fmt,
                  subfolder=subfolder, variant=variant,
                  reference_variant=reference_variant, reference_subfolder=reference_subfolder,
                  reference_revision=reference_revision)
    if report.input_errors:  # nothing to verify: not found (exit 3) or not fetched (exit 5), as the other commands
        for e in report.input_errors[1:]:
            click.echo(f"Error: {str(e).strip()}", err=True)
        _fail(report.input_errors[0])
    if as_json:
        _emit_json(report.to_dict())
    else:
        _out(report.format_text())
    if not report.ok:
        sys.exit(EXIT_VALIDATION)


def _branch(value: Optional[str]) -> Optional[str]:
    """--revision of push, --push-revision of convert: a branch name, refused as a usage error."""
    from .push import branch_problem

    why = None if value is None else branch_problem(value)
    if why:
        raise click.BadParameter(why)
    return value


@cli.command("push", epilog=EXIT_EPILOG)
@click.argument("ckpt", type=click.Path(path_type=Path, readable=False))  # an unreadable one: exit 3, from push
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, callback=lambda c, p, v: _branch(v), help="Branch to push to.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; upload nothing.")
@click.option("--with-diffusers", is_flag=True,
              help="Also upload the weights in diffusers' format, so diffusers loads the repo too.")
@click.option("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True,
              help="No upload progress bars on stderr (also hidden when stderr is not a terminal).")
def push_command(ckpt, repo_id, private, revision, create_pr, dry_run, with_diffusers, token, as_json, quiet):
    """Upload a complete converted checkpoint to a Hugging Face Hub model repo, in one commit that
    also removes the files a previously pushed checkpoint left there. Only the files its COMPLETE
    manifest lists are uploaded (with a generated README.md model card); others are named, not sent.

    \b
    Examples:
      cogvae push ckpt/ me/cogvideox-2b-vae-jax --dry-run
      cogvae push ckpt/ me/cogvideox-2b-vae-jax --private
      cogvae push ckpt-tuned/ me/cogvideox-2b-vae-ft --with-diffusers
    """
    from .push import push_checkpoint

    result = _run(push_checkpoint, ckpt, repo_id, private=private, revision=revision, create_pr=create_pr,
                  dry_run=dry_run, token=token, with_diffusers=with_diffusers, quiet=quiet)
    if as_json:
        _emit_json(result)
        return
    lines = _push_lines(result, revision=revision, create_pr=create_pr)
    skipped = result.get("not_uploaded") or []
    if skipped:  # before a dry run's closing line
        shown = ", ".join(skipped[:10]) + (f", and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        lines.insert(len(lines) - 1 if dry_run else len(lines),
                     f"not uploaded: {len(skipped)} file(s) not in the COMPLETE manifest: {shown}")
    for line in lines:
        _out(line)


def _entry(command: click.Command) -> None:
    """A console script's entry: ``command``, except that a command ended by Ctrl-C or SIGTERM
    (after its cleanup, with its one ``Error:`` line) leaves at once with its exit code: the
    interpreter's teardown could crash (exit 139) on a library's worker thread still running,
    such as an Orbax write abandoned by the interrupt."""
    global _CONSOLE_SCRIPT
    _CONSOLE_SCRIPT = True
    # A standard stream closed by the caller (``2>&-``): /dev/null in its place, or the first file
    # this process opens would take its number, and whatever writes to stderr (a library's
    # logging) would write into that file, a weights file say. Python sets such a sys.stderr to
    # None, and print(file=None) writes to stdout: progress would corrupt a --json summary.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_RDWR)
                if devnull != fd:
                    os.dup2(devnull, fd)
                    os.close(devnull)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    try:
        command.main()
    except SystemExit as e:
        if e.code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(e.code)
        raise


def main() -> None:
    """The ``cogvae`` console script."""
    _entry(cli)


def convert_main() -> None:
    """The ``cogvae-convert`` console script."""
    _entry(convert_command)


if __name__ == "__main__":  # `python -m cogvae.converter.cli ...` is the `cogvae` command group
    main()

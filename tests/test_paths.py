"""Paths as users give them, and paths the system will not let us use: ``~`` expanded everywhere
(Python API and CLI, inputs and outputs); unreadable files or folders, names longer than the file
system allows and a file given for a folder are input problems (exit 3) or output problems (exit
4) with one ``Error:`` line naming the path; Ctrl-C is exit 130 with ``Error: interrupted``.

Every command runs in-process through click's CliRunner, except the permission cases: those run
in one child process whose file-permission override is dropped (root ignores file modes; the
child runs under ``setpriv --bounding-set=-dac_override,...`` so that chmod is honoured), all
cases in one interpreter so that jax is imported once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from cogvae.converter.cli import EXIT_CODES, cli, convert_command
from cogvae.converter.convert import convert, default_source
from cogvae.converter.hub import SourceError

WEIGHTS = "diffusion_pytorch_model.safetensors"
LONG = "n" * 256  # one path component longer than NAME_MAX (255 bytes)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home folder holding ``ck`` (the tiny VAE converted, both formats, not validated: these
    tests are about paths) and ``src`` (the tiny diffusers VAE shipped with cogvae)."""
    home = tmp_path_factory.mktemp("home")
    convert(None, home / "ck", validate=False, quiet=True)
    shutil.copytree(default_source(), home / "src")
    return home


@pytest.fixture
def at_home(home, tmp_path, monkeypatch):
    """``~`` is ``home`` (HOME, which os.path.expanduser reads, is set: nothing is faked); the
    current folder is an empty one, so that a folder literally named ``~`` would show up in it."""
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _one_error_line(res, code: int, *needles: str) -> str:
    """``res`` exited with ``code`` after one ``Error: ...`` line on stderr (no traceback, no
    uncaught exception) that holds every needle; returns the line."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------
# A. '~'
# ----------------------------------------------------------------------------------------


def _api_load_checkpoint():
    from cogvae.converter import load

    assert load("~/ck").config is not None


def _api_load_diffusers():
    from cogvae.converter import load

    assert load("~/src").config is not None


def _api_read_checkpoint():
    from cogvae.converter.checkpoint import read_checkpoint

    config, params, info = read_checkpoint("~/ck", format="msgpack")
    assert params and Path(info["path"]) == Path(os.environ["HOME"]) / "ck"


def _api_checkpoint_predicates():
    from cogvae.converter.checkpoint import check_files, is_converted_checkpoint, looks_like_checkpoint

    assert looks_like_checkpoint("~/ck") and is_converted_checkpoint("~/ck")
    check_files("~/ck")


def _api_find_diffusers_vae():
    from cogvae.converter.loading import find_diffusers_vae

    assert find_diffusers_vae("~/src").weights_path == Path(os.environ["HOME"]) / "src" / WEIGHTS


def _api_verify():
    from cogvae.converter.verify import verify_checkpoint

    r = verify_checkpoint("~/ck", "~/src", parity=False)
    assert r.ok, r.format_text()


def _api_export_diffusers():
    from cogvae.converter import export_diffusers

    export_diffusers("~/ck", "~/exp-api")
    assert (Path(os.environ["HOME"]) / "exp-api" / WEIGHTS).is_file()


def _api_push_plan_and_write_checkpoint():
    from cogvae.converter.checkpoint import read_checkpoint, write_checkpoint
    from cogvae.converter.push import plan_upload

    files, card = plan_upload("~/ck", "me/vae")
    assert "COMPLETE" in {f["path"] for f in files} and card
    config, params, _ = read_checkpoint("~/ck", format="msgpack")
    out = write_checkpoint("~/wc-api", params, config, formats=("msgpack",))
    assert out == Path(os.environ["HOME"]) / "wc-api" and (out / "COMPLETE").is_file()  # the path written


def _api_save_and_convert():
    from cogvae.converter import load, save
    from cogvae.converter.convert import convert

    home = Path(os.environ["HOME"])
    summary = convert("~/src", "~/ck-api", quiet=True, validate=False, formats=("msgpack",))
    assert summary["out"] == str(home / "ck-api") and (home / "ck-api" / "COMPLETE").is_file()
    save(load("~/ck"), "~/saved-api", base="~/ck", validate=False, formats="msgpack")
    assert (home / "saved-api" / "COMPLETE").is_file()


@pytest.mark.parametrize("call", [_api_load_checkpoint, _api_load_diffusers, _api_read_checkpoint,
                                  _api_checkpoint_predicates, _api_find_diffusers_vae, _api_verify,
                                  _api_export_diffusers, _api_save_and_convert, _api_push_plan_and_write_checkpoint],
                         ids=lambda f: f.__name__[5:])
def test_tilde_is_expanded_by_the_python_api(at_home, call):
    """Nothing faked: HOME points at a real folder. A ``~/...`` path (which Python never expands
    by itself) names that folder, for reading and for writing; no folder named ``~`` appears."""
    call()
    assert list(at_home.iterdir()) == []


@pytest.mark.parametrize("args, wrote", [
    (["inspect", "~/ck"], None),
    (["inspect", "~/src"], None),
    (["verify", "--no-parity", "~/ck", "--reference", "~/src"], None),
    (["verify", "--no-parity", "~/src", "--reference", "~/ck"], None),
    (["export-diffusers", "~/ck", "--out=~/exp-cli"], "exp-cli"),
    (["convert", "~/src", "--out=~/ck-cli", "--format", "msgpack", "--no-validate", "--json"], "ck-cli"),
    (["push", "~/ck", "me/vae", "--dry-run"], None),
], ids=["inspect-ckpt", "inspect-diffusers", "verify-reference", "verify-diffusers-source", "export-diffusers",
        "convert-json", "push-dry-run"])
def test_tilde_is_expanded_by_every_command(at_home, home, args, wrote):
    """Nothing faked: HOME points at a real folder. A '~/...' that the shell left as it is (quoted,
    or ``--out=~/x``) names that folder; outputs land there and are reported by that path."""
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert list(at_home.iterdir()) == []  # no folder literally named '~'
    if wrote:
        assert (home / wrote).is_dir()
        reported = json.loads(res.stdout)["out"] if "--json" in args else res.stdout.strip()
        assert reported == str(home / wrote)
        shutil.rmtree(home / wrote)


# ----------------------------------------------------------------------------------------
# C. a path component longer than the file system allows; D. a file where a folder is wanted
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, code", [
    (["convert", "--out", LONG, "--no-validate"], 4),
    (["convert", LONG, "--out", "x", "--no-validate"], 3),
    (["verify", LONG], 3),
    (["verify", "--no-parity", "{ck}", "--reference", LONG], 3),
    (["inspect", LONG], 3),
    (["export-diffusers", LONG, "--out", "x"], 3),
], ids=["convert-out", "convert-source", "verify-source", "verify-reference", "inspect", "export-source"])
def test_a_name_too_long_is_one_error_line(at_home, home, args, code):
    """Nothing faked: a real 256-character name, which the kernel refuses (ENAMETOOLONG). An
    input is exit 3, an output exit 4, with one line naming it; nothing is written."""
    res = CliRunner().invoke(cli, [a.format(ck=home / "ck") for a in args])
    _one_error_line(res, code, "File name too long")
    assert list(at_home.iterdir()) == []


def test_a_name_too_long_is_a_source_error_in_python(at_home):
    """Nothing faked. ``load`` and ``read_checkpoint`` raise a SourceError (bad input) naming the
    path, not a bare OSError from deep inside pathlib."""
    from cogvae.converter import load
    from cogvae.converter.checkpoint import read_checkpoint

    for fn in (load, read_checkpoint):
        with pytest.raises(SourceError, match="File name too long"):
            fn(LONG)


@pytest.mark.parametrize("what", ["file", "neither", "neither-reference"])
def test_verify_of_what_is_no_model_is_an_input_error(home, tmp_path, what):
    """Nothing faked. A file given where a folder is wanted, or a folder that is neither a
    checkpoint nor a diffusers VAE (as SOURCE or --reference), is bad input (exit 3, one Error
    line), as a missing one is, not a failed verification (exit 1): there is nothing to verify."""
    junk = tmp_path / "notes"
    junk.mkdir()
    (junk / "README.md").write_text("hello")
    args, needle = {"file": ([str(home / "ck" / "params.msgpack")], "params.msgpack: not a folder"),
                    "neither": ([str(junk)], "notes: no config.json"),
                    "neither-reference": ([str(home / "ck"), "--reference", str(junk)], "notes: no config.json")}[what]
    res = CliRunner().invoke(cli, ["verify", "--no-parity", *args])
    _one_error_line(res, 3, needle)
    assert res.stdout == ""


# command -> (its arguments around the file given, the kinds of folder the message expects)
BOTH = "a converted cogvae checkpoint, or a diffusers VAE or pipeline folder"
A_FILE_CASES = {
    "convert": (["convert", "{f}", "--out", "{out}"], "a diffusers VAE or pipeline folder"),
    "verify": (["verify", "--no-parity", "{f}"], BOTH),
    "inspect": (["inspect", "{f}"], BOTH),
    "export-diffusers": (["export-diffusers", "{f}", "--out", "{out}"], "a converted cogvae checkpoint"),
    "push": (["push", "{f}", "me/x", "--dry-run"], "a converted cogvae checkpoint"),
    "load": ("load", BOTH),
}


@pytest.mark.parametrize("given", ["ck/params.msgpack", "ck/COMPLETE", f"src/{WEIGHTS}", "src/config.json"])
@pytest.mark.parametrize("command", sorted(A_FILE_CASES))
def test_a_file_of_a_model_folder_names_that_folder(home, tmp_path, command, given):
    """Nothing faked. Users point at the weights file (or config.json) they see; every command and
    ``load`` refuse it as before (exit 3, one Error line: a folder is what they take), and the
    message says which kinds of folder that command takes and names the folder the file is in,
    when that folder is of a kind the command takes: naming a checkpoint to `convert` (or a
    diffusers folder to `push`) would only lead to a second refusal."""
    from cogvae.converter import load

    f = home / given
    argv, expected = A_FILE_CASES[command]
    kind = "a converted cogvae checkpoint" if given.startswith("ck/") else "a diffusers VAE or pipeline folder"
    hint = f"; it is a file of the folder {f.parent}: give that folder" if kind in expected else ""
    needles = (f"{f}: not a folder (expected {expected}){hint}",)
    if argv == "load":
        with pytest.raises(SourceError) as e:
            load(str(f))
        assert str(e.value) == needles[0]
    else:
        res = CliRunner().invoke(cli, [a.format(f=f, out=tmp_path / "out") for a in argv])
        assert _one_error_line(res, 3) == f"Error: {needles[0]}"
        assert not (tmp_path / "out").exists()


def test_a_linked_file_names_the_folder_the_link_is_in(home, tmp_path):
    """Nothing faked but the Hub cache's shape: a snapshot's files are symlinks into blobs/ (as
    huggingface_hub writes them). The file a user points at names the snapshot's folder, the one
    they can give, not blobs/ where the link leads."""
    snap = tmp_path / "snapshots" / "abc" / "vae"
    blobs = tmp_path / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name in ("config.json", WEIGHTS):
        (blobs / name.replace(".", "_")).write_bytes((home / "src" / name).read_bytes())
        (snap / name).symlink_to(blobs / name.replace(".", "_"))
    f = snap / WEIGHTS
    res = CliRunner().invoke(cli, ["inspect", str(f)])
    assert _one_error_line(res, 3) == (f"Error: {f}: not a folder (expected {BOTH}); it is a file of the folder "
                                       f"{snap}: give that folder")


def test_a_file_of_no_model_folder_is_refused_without_naming_one(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    res = CliRunner().invoke(cli, ["inspect", str(f)])
    assert _one_error_line(res, 3) == f"Error: {f}: not a folder (expected {BOTH})"


# ----------------------------------------------------------------------------------------
# B. permission denied (and D: an unreadable --reference)
# ----------------------------------------------------------------------------------------

# id -> (what to copy, the path in the copy made unreadable, the command (or "load"), exit code,
#        what the one error line names)
PERMISSION_CASES = {
    "verify-config": ("ck", "config.json", ["verify", "--no-parity", "{x}"], 3, "{x}/config.json"),
    "verify-manifest": ("ck", "COMPLETE", ["verify", "--no-parity", "{x}"], 3, "{x}/COMPLETE"),
    "verify-reference-weights": ("src", WEIGHTS, ["verify", "--no-parity", "{ck}", "--reference", "{x}"], 3,
                                 f"reference: {{x}}/{WEIGHTS}"),
    "inspect-orbax-file": ("ck", "orbax/_METADATA", ["inspect", "{x}"], 3, "{x}/orbax/_METADATA"),
    "inspect-manifest": ("ck", "COMPLETE", ["inspect", "{x}"], 3, "{x}/COMPLETE"),
    "inspect-folder": ("ck", ".", ["inspect", "{x}"], 3, "{x}"),
    "export-orbax-folder": ("ck", "orbax", ["export-diffusers", "{x}", "--out", "{out}"], 3, "{x}/orbax"),
    "convert-source-folder": ("src", ".", ["convert", "{x}", "--out", "{out}"], 3, "{x}"),
    "convert-out-parent": (None, ".", ["convert", "--out", "{x}/ck", "--no-validate"], 4, "{x}/ck"),
    "load-config": ("ck", "config.json", "load", 3, "{x}/config.json"),
}

_CHILD = textwrap.dedent("""
    import json, os, sys
    from click.testing import CliRunner
    from cogvae.converter.cli import cli

    cases = json.loads(sys.stdin.read())
    try:  # are file modes honoured here? (root with CAP_DAC_OVERRIDE reads anything)
        open(cases.pop("probe"), "rb").close()
        print(json.dumps({"privileged": True}))
        sys.exit(0)
    except PermissionError:
        pass
    out = {}
    for cid, c in cases.items():
        if c["argv"] == "load":
            from cogvae.converter import load
            from cogvae.converter.hub import SourceError
            try:
                load(c["path"])
                out[cid] = {"exit_code": 0, "stderr": ""}
            except SourceError as e:  # what the CLI maps to exit 3
                out[cid] = {"exit_code": 3, "stderr": f"Error: {e}\\n"}
            except Exception as e:
                out[cid] = {"exit_code": None, "stderr": f"{type(e).__name__}: {e}\\n"}
            continue
        res = CliRunner().invoke(cli, c["argv"])
        exc = res.exception
        out[cid] = {"exit_code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
                    "exception": None if exc is None or isinstance(exc, SystemExit) else repr(exc)}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def permission_results(home, tmp_path_factory):
    """Real permissions: for each case a fresh copy of the checkpoint or source with one file or
    folder chmod 000, then every case run in ONE child process in which file modes apply. As root
    the child runs under setpriv with the capabilities that override file modes dropped from its
    bounding set (uid stays 0; this process keeps them, to clean up). Skipped only where that
    cannot be done (root without setpriv)."""
    base = tmp_path_factory.mktemp("perm")
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file modes cannot be made to apply")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable"]
    probe = base / "probe"
    probe.write_text("x")
    locked = [probe]
    cases, expect = {"probe": str(probe)}, {}
    for cid, (what, rel, argv, code, names) in PERMISSION_CASES.items():
        x = base / cid
        if what is None:
            x.mkdir()
        else:
            shutil.copytree(home / what, x)
        locked.append(x / rel)
        subs = {"x": str(x), "ck": str(home / "ck"), "out": str(base / f"{cid}-out")}
        cases[cid] = {"argv": argv if argv == "load" else [a.format(**subs) for a in argv], "path": str(x)}
        expect[cid] = (code, names.format(**subs), base / f"{cid}-out")
    for p in locked:
        os.chmod(p, 0)
    try:
        env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
        proc = subprocess.run([*prefix, sys.executable, "-c", _CHILD], input=json.dumps(cases), env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        for p in locked:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got.get("privileged"):
        pytest.skip("file modes do not apply even after dropping capabilities")
    return got, expect


@pytest.mark.parametrize("case", list(PERMISSION_CASES))
def test_permission_denied_is_one_error_line(permission_results, case):
    """Real permissions (chmod 000 in a child process where they apply; see the fixture). An
    unreadable input (a checkpoint's file or folder, a source folder, the weights of a
    --reference) is exit 3, an output under an unsearchable parent exit 4: one Error line naming
    the path and saying permission denied, never a traceback or a 'corrupt' checkpoint, and
    nothing is written."""
    got, expect = permission_results
    code, names, out = expect[case]
    r = got[case]
    assert r["exit_code"] == code and not r.get("exception"), r
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {names}: ") and "Permission denied" in lines[0], r
    assert "corrupt" not in lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# E. Ctrl-C
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, args", [(cli, ["convert"]), (convert_command, [])], ids=["cogvae", "cogvae-convert"])
def test_ctrl_c_is_exit_130_and_leaves_nothing(tmp_path, monkeypatch, command, args):
    """A real SIGINT, raised in this process (signal.raise_signal, with Python's default handler,
    so it arrives as KeyboardInterrupt at once) from the writer's test hook between two files of
    a conversion: the hook is the only thing replaced, to pick the moment without sleeping."""
    from cogvae.converter import checkpoint

    monkeypatch.setattr(checkpoint, "_slow_write_hook", lambda: signal.raise_signal(signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = CliRunner().invoke(command, [*args, "--out", str(tmp_path / "ck"), "--format", "msgpack",
                                           "--no-validate", "-q"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert res.exit_code == 130, (res.exit_code, res.output)
    assert res.stderr == "Error: interrupted\n" and res.stdout == ""
    assert list(tmp_path.iterdir()) == []  # neither the output nor its hidden temporary sibling
    assert EXIT_CODES[130].startswith("interrupted")
    assert "130  interrupted" in CliRunner().invoke(cli, ["--help"]).stdout


@pytest.mark.parametrize("when", ["converting", "exporting for push --with-diffusers"])
def test_sigterm_is_exit_143_and_cleans_up_as_ctrl_c(tmp_path, monkeypatch, when):
    """A real SIGTERM (a CI timeout, docker stop), sent to this process from a hook at a chosen
    moment (the hook is the only thing replaced): the command's cleanup runs as for Ctrl-C, with
    exit 143, and the SIGTERM handler in place before is put back. Python's default would end the
    process on the spot, leaving a push's temporary export (a full copy of the weights) in TMPDIR."""
    import os
    import tempfile

    from cogvae.converter import checkpoint, push

    before = signal.getsignal(signal.SIGTERM)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    if when == "converting":
        monkeypatch.setattr(checkpoint, "_slow_write_hook", lambda: os.kill(os.getpid(), signal.SIGTERM))
        res = CliRunner().invoke(convert_command, ["--out", str(tmp_path / "ck"), "--format", "msgpack",
                                                   "--no-validate", "-q"])
        left = [p for p in tmp_path.iterdir() if p != tmp]
    else:
        ck = tmp_path / "ck"
        assert CliRunner().invoke(convert_command, ["--out", str(ck), "--no-validate", "-q"]).exit_code == 0
        real = push._export_weights

        def export_then_terminated(ckpt, into):
            written = real(ckpt, into)
            assert written.is_file()  # a full export is there when the signal comes
            os.kill(os.getpid(), signal.SIGTERM)
            return written

        monkeypatch.setattr(push, "_export_weights", export_then_terminated)
        res = CliRunner().invoke(cli, ["push", str(ck), "me/x", "--dry-run", "--with-diffusers"])
        left = list(tmp.iterdir())
    assert res.exit_code == 143 and res.stderr.startswith("Error: terminated"), (res.exit_code, res.output)
    assert left == [] and list(tmp.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before
    assert "143  terminated" in CliRunner().invoke(cli, ["--help"]).stdout


@pytest.mark.parametrize("when", ["writing", "validating"])
def test_an_interrupt_python_discarded_still_stops_the_command(tmp_path, monkeypatch, when):
    """CPython discards an exception raised in some callbacks (jax's gc callback: "Exception
    ignored in ..."), so a Ctrl-C can fail to stop the command, which then replaced the output
    and exited 0, or, during validation, came back as a read error and exit 1. The signal is also
    noted; the swap into place and the validation verdict check it. Faked: the note is made from a
    hook without raising (what a discarded interrupt leaves), so the moment is exact."""
    from cogvae.converter import checkpoint, convert, interrupts

    out = tmp_path / "ck"
    assert CliRunner().invoke(convert_command, ["--out", str(out), "--format", "msgpack", "--no-validate", "-q"]
                              ).exit_code == 0
    before = (out / "params.msgpack").read_bytes()
    if when == "writing":
        monkeypatch.setattr(checkpoint, "_slow_write_hook", lambda: interrupts.note(signal.SIGINT))
    else:
        real = convert.validate_checkpoint_dir

        def interrupted_validation(*a, **k):
            interrupts.note(signal.SIGTERM)
            return {**real(*a, **k), "ok": False, "problems": ["orbax: cannot read back (interrupted)"]}

        monkeypatch.setattr(convert, "validate_checkpoint_dir", interrupted_validation)
    res = CliRunner().invoke(convert_command, ["--out", str(out), "--overwrite", "--format", "msgpack", "-q",
                                               "--dtype", "bfloat16"])
    code, line = (130, "Error: interrupted\n") if when == "writing" else (143, "Error: terminated\n")
    assert res.exit_code == code and res.stderr == line, (res.exit_code, res.output)
    assert (out / "params.msgpack").read_bytes() == before  # the output the user meant to keep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_sigterm_to_the_console_script_prints_one_line(tmp_path):
    """A real process, a real SIGTERM while it writes (COGVAE_TEST_SLOW_WRITE holds it between
    files): one ``Error: terminated`` line (an interrupted Orbax write made tensorstore print a
    traceback per chunk in flight), exit 143 (not 139 from a crash in the interpreter's teardown),
    nothing left."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "COGVAE_TEST_SLOW_WRITE": "1", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "ck"
    p = subprocess.Popen([sys.executable, "-c", "from cogvae.converter.cli import convert_main; convert_main()",
                          "--out", str(out), "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not any(tmp_path.glob(".ck.tmp-*/config.json")):
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and err.decode() == "Error: terminated\n", (p.returncode, err.decode()[-2000:])
    assert list(tmp_path.iterdir()) == []


def test_progress_and_output_survive_a_closed_or_full_stream(tmp_path):
    """Real processes, real streams. Progress on stderr is best effort: with stderr closed
    (``2>&-``), ``--json`` still gives its summary and exit 0 (it exited 1, writing nothing); a
    reader that leaves early (``| head -1``, EPIPE) ends the output, not the command (click's exit
    1 means a failed validation); a stdout that cannot take the output (/dev/full) is exit 4, said
    in one line."""
    import json
    import shutil
    import subprocess
    import sys

    exe = [sys.executable, "-c", "from cogvae.converter.cli import convert_main; convert_main()"]

    def sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})

    run = " ".join(shlex_quote(a) for a in exe)
    r = sh(f"{run} --out a --no-validate --json 2>&-")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, (r.returncode, r.stdout[-500:])
    assert (tmp_path / "a" / "COMPLETE").is_file()
    r = sh(f"{run} --out b --no-validate 2>&1 | head -1")
    assert r.returncode == 0 and r.stdout.startswith("source: "), (r.returncode, r.stdout, r.stderr)
    assert (tmp_path / "b" / "COMPLETE").is_file()
    if shutil.os.path.exists("/dev/full"):
        r = sh(f"{run} --out c --no-validate --json -q > /dev/full")
        assert r.returncode == 4 and r.stderr == "Error: cannot write to stdout: No space left on device\n", r.stderr


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)

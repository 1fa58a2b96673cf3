"""Where and how an output folder is written (``checkpoint.atomic_output_dir``, Orbax paths):
awkward paths, ``--overwrite`` swaps, killed runs, symlinks, parents made for ``--out``.

Everything runs the real converter (CliRunner, in-process) on the tiny VAE shipped in the
package, writing real Orbax and msgpack files on this machine's file system. What is faked is
said per test: a killed run is reproduced by the state it leaves (a kill cannot be delivered
in-process), and a file system without ``renameat2(RENAME_EXCHANGE)`` by replacing the swap.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import cogvae.converter.checkpoint as ck
from cogvae.converter import load
from cogvae.converter.checkpoint import read_checkpoint
from cogvae.converter.cli import convert_command


def _convert(*args: str):
    r = CliRunner().invoke(convert_command, [*args, "-q"], catch_exceptions=False)
    return r.exit_code, r.stderr


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch):
    """tempfile's folder moved into the test's, so that what cogvae leaves there can be listed."""
    t = tmp_path / "systmp"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


# A name that is not UTF-8 (Linux allows any bytes but "/" and NUL) is held by Python as
# surrogate escapes: encoding it (the temporary sibling's name) and tensorstore (which cannot take
# such a str) were tracebacks.
_NOT_UTF8 = os.fsdecode(b"ck\xffname")
_NOT_UTF8_LONG = os.fsdecode(b"\xfe" * 250)


@pytest.mark.parametrize("name", ["ck[1]", "a\\b", "run[lr=1e-4]/ck", "x" * 250, _NOT_UTF8, _NOT_UTF8_LONG],
                         ids=["brackets", "backslash", "brackets-in-parent", "250-bytes", "not-utf8",
                              "not-utf8-250-bytes"])
def test_awkward_output_paths_write_loadable_checkpoints(tmp_path, own_tmpdir, name):
    """Orbax finds its parts with a glob (a "[...]" anywhere in the path matched nothing, so the
    Orbax part never restored) and tensorstore takes a backslash for a separator (it wrote outside
    the temporary folder); a 250-byte name, legal, was refused once ".tmp-..." was added; a name
    that is not UTF-8 was a traceback. Each now converts without validation (which used to hide
    nothing: exit 0 and a manifest over a broken orbax/), and both formats load."""
    out = tmp_path / name
    out.parent.mkdir(exist_ok=True)
    code, err = _convert("--out", str(out), "--no-validate")
    assert code == 0, err
    for fmt in ("orbax", "msgpack"):
        _, params, info = read_checkpoint(out, format=fmt)
        assert info["format"] == fmt and len(params) == 240
    assert load(out).config == read_checkpoint(out)[0]
    assert _hidden(out.parent) == [] and sorted(os.listdir(own_tmpdir)) == []  # no temporaries, no links
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name.split("/")[0], "systmp"})


def test_an_orbax_write_that_does_not_read_back_is_an_output_error(tmp_path, monkeypatch):
    """Whatever Orbax writes is read back (its metadata: no tensor bytes) before a manifest is
    written for it. Faked: the symlink that keeps glob characters away from Orbax is taken out,
    so Orbax writes the broken checkpoint it used to write for such a path."""
    import contextlib

    @contextlib.contextmanager
    def raw(path):
        yield Path(path).absolute()

    monkeypatch.setattr(ck, "_orbax_path", raw)
    out = tmp_path / "ck[1]"
    code, err = _convert("--out", str(out), "--no-validate")
    assert code == 4, err
    assert err.startswith(f"Error: {out}: cannot write checkpoint: ") and "does not read back" in err
    assert not out.exists() and _hidden(tmp_path) == []


def _killed_overwrite(out: Path) -> Path:
    """The state a SIGKILL leaves between the two renames of an --overwrite where the file system
    cannot swap folders: the old checkpoint set aside under ``.NAME.old-*`` (owned by a process
    that no longer exists), nothing at ``out``."""
    aside = out.parent / f".{out.name}.old-killed"
    aside.mkdir()
    dead = 2 ** 22 + 12345  # above the kernel's pid_max default: no such process
    (aside / ck.OWNER_FILE).write_text(f"{socket.gethostname()} {dead}\n")
    os.rename(out, aside / "old")
    return aside


def test_a_killed_overwrite_gives_the_old_checkpoint_back(tmp_path):
    """The next run to the same --out puts the set-aside checkpoint back before anything else (it
    used to delete it as a stale temporary, even when that run then failed), so the old
    checkpoint is never lost; that run then sees it and needs --overwrite as usual."""
    out = tmp_path / "ck"
    assert _convert("--out", str(out), "--no-validate", "--format", "msgpack")[0] == 0
    before = (out / "params.msgpack").read_bytes()
    _killed_overwrite(out)
    code, err = _convert("--out", str(out), "--no-validate")
    assert code == 4 and "output already exists" in err, err
    assert (out / "params.msgpack").read_bytes() == before and _hidden(tmp_path) == []
    assert read_checkpoint(out)[2]["format"] == "msgpack"


def test_overwrite_swaps_the_folders_in_one_step(tmp_path, monkeypatch):
    """On a file system with renameat2(RENAME_EXCHANGE) (ext4, xfs, btrfs, tmpfs) --overwrite
    swaps old and new in one atomic step: there is no moment without a checkpoint at --out, so
    no kill can lose it. Checked by making every plain rename fail."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert ck._exchange(a, b), "this file system cannot swap folders atomically"
    out = tmp_path / "ck"
    assert _convert("--out", str(out), "--no-validate", "--format", "msgpack")[0] == 0

    def no_rename(*args, **kwargs):
        raise AssertionError("the swap must not go through rename")

    monkeypatch.setattr(os, "rename", no_rename)  # (msgpack only: Orbax renames its own folders)
    code, err = _convert("--out", str(out), "--no-validate", "--overwrite", "--format", "msgpack", "--dtype",
                         "bfloat16")
    assert code == 0, err
    monkeypatch.undo()
    assert {a.dtype.name for a in read_checkpoint(out)[1].values()} == {"bfloat16"} and _hidden(tmp_path) == []


def test_overwrite_without_an_atomic_swap_still_replaces(tmp_path, monkeypatch):
    """Faked: a file system without the swap (``_exchange`` says so); the old checkpoint is set
    aside, the new one renamed in, the old one deleted."""
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    out = tmp_path / "ck"
    assert _convert("--out", str(out), "--no-validate", "--format", "msgpack")[0] == 0
    code, err = _convert("--out", str(out), "--no-validate", "--overwrite", "--format", "orbax")
    assert code == 0, err
    assert read_checkpoint(out)[2]["formats"] == ["orbax"] and _hidden(tmp_path) == []


def test_an_output_symlink_stays_a_link_to_the_new_checkpoint(tmp_path):
    """``--out latest --overwrite`` where latest -> run3: run3 is replaced and the link kept (the
    link itself used to be replaced by a folder, leaving run3 stale)."""
    real, link = tmp_path / "run3", tmp_path / "latest"
    assert _convert("--out", str(real), "--no-validate", "--format", "msgpack")[0] == 0
    link.symlink_to(real.name)
    code, err = _convert("--out", str(link), "--no-validate", "--overwrite", "--format", "orbax")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == real.name
    assert read_checkpoint(real)[2]["formats"] == ["orbax"] and _hidden(tmp_path) == []


def test_a_dangling_output_symlink_is_named_as_such(tmp_path):
    link = tmp_path / "latest"
    link.symlink_to("gone")
    code, err = _convert("--out", str(link), "--no-validate")
    assert code == 4 and err == f"Error: {link}: a symlink to gone, which does not exist; remove the link or pick " \
                                "another output folder\n"


@pytest.mark.parametrize("out", [".", ".."])
def test_the_current_folder_is_never_replaced(tmp_path, monkeypatch, out):
    """``--out . --overwrite`` in an empty folder renamed the shell's current folder away."""
    here = tmp_path / "empty" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    code, err = _convert("--out", out, "--no-validate", "--overwrite")
    assert code == 4 and "the output folder " in err and "the current folder" in err, err
    assert here.is_dir() and os.listdir(here) == [] and _hidden(here.parent) == []


def test_parent_folders_made_for_a_failed_output_are_removed(tmp_path, monkeypatch):
    """--out a/b/c whose writing fails (faked: the msgpack writer reports a full disk, as it would
    on one) leaves no a/b behind."""
    import errno

    def full(path, params):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "_write_msgpack", full)
    code, err = _convert("--out", str(tmp_path / "a" / "b" / "c"), "--no-validate", "--format", "msgpack")
    assert code == 4 and "No space left on device" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("inside", ["orbax/diffusers", "diffusers"])
def test_no_output_goes_inside_the_checkpoint_it_reads(tmp_path, inside):
    """export-diffusers into the checkpoint it exports (and save into its base checkpoint) wrote
    files the checkpoint's manifest does not list, which made it unloadable; refused, exit 4, the
    checkpoint unchanged. (Saving onto the base itself, with overwrite, stays a save in place.)"""
    from cogvae.converter import save
    from cogvae.converter.checkpoint import OutputError, check_files
    from cogvae.converter.cli import cli

    ckpt = tmp_path / "ck"
    assert _convert("--out", str(ckpt), "--no-validate")[0] == 0
    r = CliRunner().invoke(cli, ["export-diffusers", str(ckpt), "--out", str(ckpt / inside)])
    assert r.exit_code == 4 and "is inside the checkpoint" in r.stderr, r.stderr
    with pytest.raises(OutputError, match="is inside the checkpoint"):
        save(load(ckpt), ckpt / inside, base=ckpt, validate=False)
    check_files(ckpt)
    assert sorted(os.listdir(ckpt)) == ["COMPLETE", "config.json", "orbax", "params.msgpack", "provenance.json"]


def test_every_file_is_on_disk_before_the_output_appears(tmp_path, monkeypatch):
    """The export's config.json and weights were renamed into place without an fsync: after a
    crash the folder could exist with an empty weights file. Every file of the temporary folder is
    now synced before the rename (recorded by wrapping ``_fsync_path``; nothing else is faked)."""
    from cogvae.converter import export_diffusers
    from cogvae.converter.convert import default_source

    synced: list[Path] = []
    real = ck._fsync_path
    monkeypatch.setattr(ck, "_fsync_path", lambda p, directory=False: (synced.append(Path(p)), real(p, directory))[1])
    vae = load(default_source())
    export_diffusers(vae, tmp_path / "vae")
    files = {p.name for p in synced if p.parent.name.startswith(".vae.tmp-")}
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= files, synced


def test_an_output_whose_folder_cannot_take_a_temporary_sibling_says_so(tmp_path, monkeypatch):
    """A writable mount point inside a read-only folder (a container volume): the output is
    written next to where it goes and renamed, so the parent must be writable; the error says
    that instead of "cannot create output folder" for a folder that exists. The read-only file
    system is faked (mkdtemp raises EROFS): root ignores permission bits, and mounts need privileges."""
    import errno

    (tmp_path / "vol").mkdir()

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", erofs)
    code, err = _convert("--out", str(tmp_path / "vol"), "--overwrite")
    assert code == 4, err
    assert f"cannot create a temporary folder in {tmp_path} (Read-only file system)" in err
    assert f"so {tmp_path} must be writable" in err


@pytest.mark.parametrize("command, failing", [("export", "diffusion_pytorch_model.safetensors"),
                                              ("convert", "params.msgpack"), ("convert", "COMPLETE")])
def test_a_sync_that_reports_a_failed_write_stops_the_output(tmp_path, monkeypatch, command, failing):
    """fsync is where a delayed write failure shows (EIO, or ENOSPC on NFS): the output is not
    renamed into place, exit 4 names the file, nothing is left. The failure is faked (os.fsync
    raises EIO for that one file): a failing disk cannot be had here."""
    import errno

    from cogvae.converter.cli import cli

    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/" + failing):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    args = (["export-diffusers", str(_converted(tmp_path)), "--out", str(out)] if command == "export"
            else ["convert", "--out", str(out), "-q"])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 4, r.output
    assert f"/{failing}: data not written to disk: Input/output error" in r.stderr, r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _converted(tmp_path: Path) -> Path:
    code, err = _convert("--out", str(tmp_path / "ckpt"))
    assert code == 0, err
    return tmp_path / "ckpt"


def test_a_swapped_out_old_output_is_owned_until_it_is_gone(tmp_path, monkeypatch):
    """After the swap the temporary sibling holds the previous output; a run killed while deleting
    it left a full copy (1.7 GB at 2b) that no later run removed, as it had no owner file. It is
    owned again at once and its owner file goes last (recorded at the delete; nothing faked)."""
    out = tmp_path / "ck"
    assert _convert("--out", str(out), "--format", "msgpack", "--no-validate")[0] == 0
    seen = []
    real = ck._remove_owner_last

    def record(d):
        seen.append((d.name, (d / ck.OWNER_FILE).read_text().split()[1], (d / "params.msgpack").exists()))
        real(d)

    monkeypatch.setattr(ck, "_remove_owner_last", record)
    assert _convert("--out", str(out), "--format", "msgpack", "--no-validate", "--overwrite")[0] == 0
    assert len(seen) == 1 and seen[0][0].startswith(".ck.") and seen[0][1:] == (str(os.getpid()), True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_an_ownerless_leftover_is_removed_once_it_is_old(tmp_path):
    """A leftover without an owner file (a run killed in the instant it had none, or by an older
    cogvae): one that old is removed by the next run; a fresh one may belong to a run now
    swapping, and stays."""
    import time

    old, fresh = tmp_path / ".ck.tmp-killedlongago", tmp_path / ".ck.tmp-swappingnow"
    for d in (old, fresh):
        (d / "orbax").mkdir(parents=True)
        (d / "COMPLETE").write_text("{}")
    t = time.time() - ck.OWNERLESS_STALE_S - 60
    os.utime(old, (t, t))
    assert _convert("--out", str(tmp_path / "ck"), "--format", "msgpack", "--no-validate")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.tmp-swappingnow", "ck"]


def _after_last_check(monkeypatch, action):
    """Run ``action()`` right after the output's last check before it is moved into place: what
    another process does in that window. Faked: the timing only (a wrapped ``_preflight``); the
    folders, renames and swaps are real."""
    real, calls = ck._preflight, []

    def preflight(out, overwrite, replaces="checkpoint"):
        real(out, overwrite, replaces)
        calls.append(out)
        if len(calls) == 2:  # the first comes before the work, the second just before the move
            action()

    monkeypatch.setattr(ck, "_preflight", preflight)
    return calls


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2", "no-renameat2"])
def test_a_folder_that_appears_at_the_output_meanwhile_is_never_replaced(tmp_path, monkeypatch, swap):
    """Without --overwrite, a folder of someone's files put at --out while the checkpoint was
    being written is left as it is (exit 4): the move used to swap it out and delete it."""
    if not swap:  # faked: a system without renameat2 (neither the swap nor the no-replace rename)
        monkeypatch.setattr(ck, "_renameat2", lambda a, b, flags: False)
    out = tmp_path / "ck"

    def appear():
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    calls = _after_last_check(monkeypatch, appear)
    code, err = _convert("--out", str(out), "--no-validate", "--format", "msgpack")
    assert len(calls) == 2
    assert code == 4 and "output already exists: it appeared while the output was being written" in err, err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("what", ["folder", "file", "unlistable folder"])
@pytest.mark.parametrize("swap", [True, False], ids=["renameat2", "no-renameat2"])
def test_overwrite_never_replaces_what_was_put_at_the_output_meanwhile(tmp_path, monkeypatch, swap, what):
    """--overwrite replaces a checkpoint; if something else took its place after the last check
    (a folder of other files, a file, a folder whose listing fails), the swap puts it back and
    stops (exit 4) rather than deleting it. A file, or a folder that could not be listed, was
    deleted (or left hidden) behind a "cannot move the finished output" error, the new checkpoint
    in place. Faked for the unlistable folder: the listing, to fail as it does without read
    permission (root reads anything here)."""
    if not swap:  # faked: a file system without the atomic swap
        monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    out = tmp_path / "ck"
    assert _convert("--out", str(out), "--no-validate", "--format", "msgpack")[0] == 0

    def replace_by_user_things():
        os.rename(out, tmp_path / "moved")
        if what == "file":
            out.write_text("mine")
            return
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if what == "unlistable folder":
            real = ck._replaceable

            def unlistable(folder, replaces):
                if (folder / "notes.txt").exists():
                    raise PermissionError(13, "Permission denied", str(folder))
                return real(folder, replaces)

            monkeypatch.setattr(ck, "_replaceable", unlistable)

    calls = _after_last_check(monkeypatch, replace_by_user_things)
    code, err = _convert("--out", str(out), "--no-validate", "--overwrite", "--format", "msgpack")
    assert len(calls) == 2
    assert code == 4 and "was put there while the output was being written); left as it is" in err, err
    if what == "file":
        assert out.read_text() == "mine"
    else:
        assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert _hidden(tmp_path) == []


def test_an_output_path_through_a_symlink_and_dotdot_is_where_readers_find_it(tmp_path):
    """``--out far/../ck`` with ``far`` a symlink: the system resolves the link first, so readers
    of that path look next to the link's target. It was written next to the link (``..`` taken
    away by text), and reading ``far/../ck`` then found nothing."""
    target = tmp_path / "x" / "y"
    target.mkdir(parents=True)
    (tmp_path / "far").symlink_to(target)
    given = tmp_path / "far" / ".." / "ck"
    code, err = _convert("--out", str(given), "--no-validate", "--format", "msgpack")
    assert code == 0, err
    assert (tmp_path / "x" / "ck").is_dir() and not (tmp_path / "ck").exists()
    assert read_checkpoint(given)[2]["formats"] == ["msgpack"]

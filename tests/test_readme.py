"""The README's Python examples run as written.

Every ```python block of README.md runs, in order and unchanged, in one fresh Python process: a
reader following the README in one session. Then its ``cogvae`` command lines run, as written,
except ``cogvae push`` (a write to the Hub; ``test_push.py`` runs it against an injected HfApi). What stands in for what the README assumes, and why:

- the real CogVideoX-2b weights (10 GB of pipeline, no network here): the tiny CogVideoX VAE
  shipped in the package (diffusers' format; 16 latent channels, so the README's latent shapes
  hold), laid out as a pipeline folder at ``path/to/CogVideoX-2b`` and converted to ``ckpt/``;
- the Hugging Face Hub (no network here): a real huggingface_hub cache, used offline, holding
  ``THUDM/CogVideoX-2b`` (that pipeline) and ``me/cogvideox-2b-vae-jax`` (``ckpt/``'s files as
  ``cogvae push`` would upload them, at ``main`` and at the branch ``ft-v2``);
- the four devices of the multi-device example: four CPU devices
  (``--xla_force_host_platform_device_count=4``);
- the home folder (the compilation cache's default place): a temporary one.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _hubcache import add_snapshot, pipeline_files
from _scripts import script

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "converter" / "assets" / "tiny-cogvideox-vae"


def blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.S | re.M)


def cli_lines(markdown: str) -> list[list[str]]:
    """The README's cogvae command lines, except ``cogvae push`` (it writes to the Hub; test_push.py
    runs it against an injected HfApi)."""
    lines = [shlex.split(line, comments=True) for b in blocks(markdown, "bash") for line in b.splitlines()]
    return [a for a in lines if a and a[0] in ("cogvae", "cogvae-convert") and a[1] != "push"]


def test_the_readme_has_python_examples():
    readme = (ROOT / "README.md").read_text()
    assert len(blocks(readme, "python")) >= 5
    assert [a[:2] for a in cli_lines(readme)] == [
        ["cogvae-convert", "THUDM/CogVideoX-2b"], ["cogvae", "verify"], ["cogvae", "export-diffusers"],
        ["cogvae", "inspect"]]


@pytest.fixture
def world(tmp_path):
    """What the README assumes (see the module docstring), under ``tmp_path``: the pipeline folder,
    ``ckpt/``, the Hub cache, a home folder; returns (folder, environment for the subprocess)."""
    from cogvae.converter.convert import convert
    from cogvae.converter.push import plan_upload

    pipe = tmp_path / "path" / "to" / "CogVideoX-2b"
    shutil.copytree(TINY, pipe / "vae")
    convert(str(pipe), tmp_path / "ckpt", quiet=True, validate=False)

    cache = tmp_path / "hub"
    repo = "me/cogvideox-2b-vae-jax"
    listed, card = plan_upload(tmp_path / "ckpt", repo)
    (tmp_path / "card.md").write_text(card)
    files = {f["path"]: tmp_path / ("card.md" if f["path"] == "README.md" else f"ckpt/{f['path']}") for f in listed}
    add_snapshot(cache, repo, files, commit="1" * 40, refs=("main", "ft-v2"))
    add_snapshot(cache, "THUDM/CogVideoX-2b", pipeline_files(pipe / "vae"), commit="2" * 40)

    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "COGVAE_", "XLA_", "JAX_"))}
    env.update(HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return tmp_path, env


# Slow (about 3 minutes: the examples decode and encode a 49x480x720 video, and decode it again
# over 4 devices).
@pytest.mark.slow
def test_the_readmes_python_examples_run_as_written(world):
    here, env = world
    script = here / "readme_examples.py"
    script.write_text("\n".join(blocks((ROOT / "README.md").read_text(), "python")))
    run = subprocess.run([sys.executable, str(script)], cwd=here, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, f"README examples failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    # What the examples write is there, complete.
    assert (here / "ckpt-tuned" / "COMPLETE").is_file()
    assert (here / "vae-tuned-diffusers" / "diffusion_pytorch_model.safetensors").is_file()
    assert (here / "vae-tuned-fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert any((here / "home" / ".cache" / "cogvae" / "jax").iterdir())


@pytest.mark.slow  # about a minute; test_convert_cli.py runs each command in the default run
def test_the_readmes_command_lines_run_as_written(world):
    """In a folder of their own: the first line writes ckpt/ there from the Hub cache."""
    here, env = world
    (here / "cli").mkdir()
    for argv in cli_lines((ROOT / "README.md").read_text()):
        run = subprocess.run([script(argv[0]), *argv[1:]], cwd=here / "cli", env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{shlex.join(argv)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert (here / "cli" / "vae-diffusers" / "diffusion_pytorch_model.safetensors").is_file()


def test_every_option_of_every_command_is_in_the_readme():
    """Each option a command's --help lists is named where the README describes that command (a
    reader finds every flag without reading --help; a flag renamed or added shows up here): the
    options of `cogvae-convert` in "Converting the real model", each subcommand's in its own item
    of the list under "Verify, export, inspect, push". Click's own --help is left out."""
    import click

    from cogvae.converter.cli import cli

    readme = (ROOT / "README.md").read_text()

    def section(title: str) -> str:
        start = readme.index(f"\n## {title}\n")
        end = readme.find("\n## ", start + 1)
        return readme[start:end if end > 0 else None]

    where = {"convert": section("Converting the real model")}
    for item in re.findall(r"^- `[a-z-]+ .*?(?=^- |^$)", section("Verify, export, inspect, push"),
                           flags=re.S | re.M):
        where[item.split()[1].strip("`")] = item
    assert set(where) == set(cli.commands), sorted(set(cli.commands) ^ set(where))
    missing = []
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                flags = [f for f in param.opts + param.secondary_opts if f.startswith("--")]
                if flags and flags[0] != "--help" and \
                        not any(re.search(rf"{re.escape(f)}(?![\w-])", where[name]) for f in flags):
                    missing.append(f"{name} {flags[0]}")
    assert missing == []

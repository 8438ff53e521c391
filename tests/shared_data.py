"""Real data from public git repositories, which the project may not commit: it lives beside the checkout at
../shared/data (or where $BIOADAPT_SHARED_DATA points), read-only. A fresh clone without it skips the tests that
need it, each with one line naming the missing folder; under CI (CI=true), where it is always provided, a missing
folder fails the test instead."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("BIOADAPT_SHARED_DATA")
                   or Path(__file__).resolve().parents[2] / "shared" / "data")


def shared_folder(name: str) -> Path:
    """The folder ``name`` of the shared data, or a skip (a failure under CI) saying it is missing."""
    import pytest  # here, not at the top: benchmarks import SHARED_DATA without pytest
    from conftest import IN_CI

    folder = SHARED_DATA / name
    if not folder.is_dir():
        message = (f"{folder} is missing: real data from public repositories is not part of the repository "
                   "(see tests/data/README.md; set BIOADAPT_SHARED_DATA to where it lives)")
        if IN_CI:
            pytest.fail(f"{message} [CI=true: CI provides it, so this test must run, not skip]", pytrace=False)
        pytest.skip(message)
    return folder

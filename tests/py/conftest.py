"""Shared pytest fixtures: paths of the repo, its programs and test data."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def data_path(*parts):
    """A file in tests/data (committed test data)."""
    return ROOT / "tests" / "data" / pathlib.Path(*parts)


@pytest.fixture
def root():
    return ROOT


def prog(name):
    """Path of a built program in the repo root (built by `make`)."""
    p = ROOT / name
    if not p.exists():
        pytest.fail("%s is not built (run make)" % name)
    return str(p)

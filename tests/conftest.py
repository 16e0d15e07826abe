"""Test-suite settings: Hypothesis profiles (HYPOTHESIS_PROFILE=dev|ci|thorough; CI sets ci)."""

import os
import tempfile

import pytest
from hypothesis import settings

from harness.cases import register_profiles

register_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _temporary_files_under_tmp_path(tmp_path, monkeypatch):
    """What the code under test puts in the temporary directory (e.g. cases saved by a certify
    without report_dir) lands in the test's own tmp_path, which pytest cleans up. Only this
    process's ``tempfile`` is redirected, not TMPDIR: child programs such as Chromium put sockets
    there, whose paths must stay short."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

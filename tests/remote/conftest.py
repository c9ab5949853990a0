"""The ssh:// tests' OpenSSH server on loopback (sshd.py), one per test session.

Without sshd the tests skip locally, but fail under CI (env var CI set; .ci/run installs it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sshd import HAVE_SSHD, Sshd, start_sshd, stop_sshd  # noqa: E402


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    if not HAVE_SSHD:
        if os.environ.get("CI"):
            pytest.fail("OpenSSH is not installed, and CI must run the ssh tests (.ci/run installs it)")
        pytest.skip("openssh-server / openssh-client not installed")
    s = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield s
    finally:
        stop_sshd(s)

"""Pytest plugin (loaded by conftest): with HM3_REPORT_DIR set, as tests/device/run_gpu_tests.sh does, each failing
test's report is appended to $HM3_REPORT_DIR/failures.log when it fails. A device run killed at its time limit
(pytest stuck in a native compile does not stop on SIGINT) never prints pytest's summary; this file survives it."""

from __future__ import annotations

import os

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    out = os.environ.get("HM3_REPORT_DIR")
    if out and report.failed:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "failures.log"), "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")

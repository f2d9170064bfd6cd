"""The fault suite's record: every fault injected and what was checked after it, printed at the end of the run
(and written as JSON where COMPRESS_FAULT_RECORD names a file: benchmarks/fault_report.py makes the report)."""

from __future__ import annotations

import json
import os

import pytest

INJECTED: list[dict] = []


@pytest.fixture
def record_fault(request):
    """record_fault(command, point, fault, checks): one row of the suite's record, kept if the test passes."""
    rows: list[dict] = []

    def record(command: str, point: str, fault: str, checks: list[str]) -> None:
        rows.append({"test": request.node.nodeid, "command": command, "point": point, "fault": fault,
                     "checks": checks})

    yield record
    outcome = getattr(request.node, "fault_outcome", None)
    for row in rows:
        INJECTED.append(row | {"passed": outcome == "passed"})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.fault_outcome = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not INJECTED:
        return
    terminalreporter.section(f"fault suite: {len(INJECTED)} faults injected")
    for row in INJECTED:
        status = "ok" if row["passed"] else "FAILED"
        terminalreporter.line(f"{status:6} {row['command']:<12} {row['fault']:<8} at {row['point']}: "
                              + "; ".join(row["checks"]))
    target = os.environ.get("COMPRESS_FAULT_RECORD")
    if target:
        with open(target, "w") as f:
            json.dump(INJECTED, f, indent=1)

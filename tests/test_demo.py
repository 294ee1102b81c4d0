"""The main job, reduced: `python -m demo --quick` (what `make demo` runs, reduced) runs every step and writes the report."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.slow
def test_quick_demo_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=1500,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert [int(n) for n in re.findall(r"=== Step (\d)/7", log)] == [1, 2, 3, 4, 5, 6, 7]
    # each step shows the command a user would type
    for command in (
        "retriever-server build",
        "autorefine train-sft",
        "autorefine train-grpo",
        "autorefine evaluate",
    ):
        assert f"$ {command}" in log
    report = out / "report"
    assert {"README.md", "curves.png", "metrics.md", "examples.md"} <= {p.name for p in report.iterdir()}
    assert (report / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (report / "metrics.md").read_text()
    assert table.count("\n| warm start |") == 2 and table.count("\n| after GRPO |") == 2
    assert (report / "examples.md").read_text().count("### ") == 3
    summary = (report / "README.md").read_text()
    assert str(out / "grpo" / "final") in summary and "What to run next" in summary
    assert (out / "grpo" / "final" / "model.safetensors").is_file()
    # the retrievers the demo started are gone
    urls = re.findall(r"at (http://127\.0\.0\.1:\d+)", log)
    assert len(urls) >= 2
    for url in urls:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)

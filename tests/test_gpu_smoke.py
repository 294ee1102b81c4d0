"""scripts/gpu_smoke.sh: its CPU mode end to end (what CI can run), and its table and exit status."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


def smoke_module(monkeypatch):
    """scripts/gpu_smoke.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO_ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_smoke", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_mode_runs_every_check_and_prints_the_table(tmp_path):
    out = tmp_path / "smoke"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/gpu_smoke.sh"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for prefix in ("torch ", "transformers ", "trl ", "device: no CUDA device"):
        assert any(line.startswith(prefix) for line in lines[:10]), prefix
    rows = {line.split("  ")[0]: line for line in lines if re.match(r"^[a-z][a-z -]+  ", line)}
    for name in ("policy", "retriever", "grpo transformers", "held-out evaluation", "resume"):
        assert re.match(rf"^{name} +pass ", rows[name]), rows.get(name)
    for mode in ("colocate", "server"):
        assert "skipped: --cpu" in rows[f"grpo vllm {mode}"]
    ratio = float(rows["grpo transformers"].split()[4])  # name (2 words), status, seconds, IS ratio
    assert 0.9 < ratio < 1.1
    assert (out / "report.txt").read_text().strip() in result.stdout
    assert (out / "run" / "checkpoint-2").is_dir() and (out / "run" / "checkpoint-3").is_dir()


def test_a_failed_row_fails_the_run_and_shows_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main sets it for --cpu; restored after the test
    smoke = smoke_module(monkeypatch)
    rows = [smoke.Row("policy", detail="0.2M parameters"), smoke.Row("resume", "FAIL", 1.5, detail="boom")]
    monkeypatch.setattr(smoke, "run_checks", lambda out, cpu, steps: rows)
    assert smoke.main(["--cpu", "--out", str(tmp_path / "x")]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"^resume +FAIL +1\.5 .* boom$", printed, re.MULTILINE)
    rows[1].status = "skipped: vllm not installed"
    assert smoke.main(["--cpu", "--out", str(tmp_path / "y")]) == 0

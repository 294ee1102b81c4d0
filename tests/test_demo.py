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


# --- the real model of the demo: SmolLM2 and its shipped SFT adapter ----------------------------------------

ADAPTER = REPO_ROOT / "data" / "adapters" / "smollm2-sft-lora"


def test_the_shipped_adapter_is_complete_and_changes_smollm2(smollm2_dir):
    import json

    import torch

    from autorefine.modeling import apply_adapter, load_policy

    files = {p.name for p in ADAPTER.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in ADAPTER.iterdir()) < 20 * 2**20  # a few MB, fit for git
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "runs/models/smollm2"  # where `fetch-model` puts the base
    readme = (ADAPTER / "README.md").read_text()
    assert "Apache-2.0" in readme and "CC BY-SA 4.0" in readme and "make_smollm2_adapter.py" in readme
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base = load_policy(smollm2_dir, dtype="float32").eval()(ids).logits
        adapted = apply_adapter(load_policy(smollm2_dir, dtype="float32"), ADAPTER).eval()(ids).logits
    assert not torch.allclose(base, adapted, atol=1e-3)


@pytest.mark.slow
def test_the_demo_real_model_stage_evaluates_the_shipped_adapter(smollm2_dir, tmp_path, monkeypatch, capsys):
    import json

    from demo.run import REAL_ADAPTER, Console, real_model_section
    from testbed.retriever import ensure_bm25_index, running_retriever

    monkeypatch.chdir(REPO_ROOT)  # the demo runs from the repository root, with relative paths
    index = ensure_bm25_index(REPO_ROOT / "data" / "demo" / "corpus.jsonl", tmp_path / "bm25")
    with running_retriever(index) as url:
        results = real_model_section(tmp_path, url, 3, Console(1), model=smollm2_dir)
    assert list(results) == ["zero-shot, no retrieval", "zero-shot, retrieval", "SFT adapter, retrieval"]
    run = json.loads((tmp_path / "eval" / "smollm2-sft" / "run.json").read_text())
    assert run["identity"]["adapter"] == str((REPO_ROOT / REAL_ADAPTER).resolve())
    zero = results["zero-shot, retrieval"]["datasets"]["hotpotqa_dev"]
    sft = results["SFT adapter, retrieval"]["datasets"]["hotpotqa_dev"]
    assert zero["format"] == 0 and zero["searches"] == 0  # zero-shot it never writes the protocol's tags
    assert sft["searches"] > 0  # the warm-started model searches
    out = capsys.readouterr().out
    assert f"--adapter {REAL_ADAPTER}" in out and "$ autorefine infer" in out

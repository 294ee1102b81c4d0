"""scripts/get_wiki18.sh: --help, --dry-run commands, and a real run against a local stand-in for the hub."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from retriever_server.manifest import read_manifest
from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "get_wiki18.sh"
# No hf / huggingface-cli / retriever-server on this PATH: what --dry-run prints must not depend on them.
BARE_PATH = "/usr/bin:/bin"


def _script(*args: str, path: str = BARE_PATH, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, "PATH": path, **env},
    )


def test_help_exits_0_and_documents_the_options() -> None:
    done = _script("--help")
    assert done.returncode == 0 and done.stderr == ""
    for word in (
        "--out",
        "--index flat",
        "--index hnsw",
        "--build",
        "--dry-run",
        "huggingface-cli",
        "--encoder",
    ):
        assert word in done.stdout


def test_dry_run_flat_prints_every_command_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x"
    done = _script("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    parts = f"{out}/parts/wiki-18-e5-index"
    assert done.stdout.splitlines() == [
        f"hf download PeterJinGo/wiki-18-corpus wiki-18.jsonl.gz --repo-type dataset --local-dir {out}",
        f"gzip -d {out}/wiki-18.jsonl.gz",
        f"hf download PeterJinGo/wiki-18-e5-index --repo-type dataset --include 'part_*' --local-dir {parts}",
        f"cat {parts}/part_* > {out}/e5_Flat.index.partial",
        f"mv {out}/e5_Flat.index.partial {out}/e5_Flat.index",
        f"rm -r {parts}",
        f"retriever-server build --corpus {out}/wiki-18.jsonl --encoder intfloat/e5-base-v2 "
        f"--import-faiss {out}/e5_Flat.index --import-mode auto --out {out}/index-e5-flat",
    ]
    # Disk and RAM needs go to stderr.
    assert "~65 GB" in done.stderr and "~14 GB" in done.stderr and "GPU" in done.stderr
    assert not out.exists()


def test_dry_run_hnsw_and_own_build(tmp_path: Path) -> None:
    hnsw = _script("--dry-run", "--out", str(tmp_path), "--index", "hnsw", "--keep-parts")
    assert hnsw.returncode == 0, hnsw.stderr
    assert f"--include 'part_*' --local-dir {tmp_path}/parts/wiki-18-e5-index-HNSW64" in hnsw.stdout
    assert f"--import-faiss {tmp_path}/e5_HNSW64.index" in hnsw.stdout and "rm -r" not in hnsw.stdout
    assert "~76 GB" in hnsw.stderr

    own = _script("--dry-run", "--out", str(tmp_path), "--build", "ivfpq", "--", "--delete-shards")
    assert own.returncode == 0, own.stderr
    assert "wiki-18-e5-index" not in own.stdout  # nothing prebuilt is downloaded
    assert own.stdout.splitlines()[-1] == (
        f"retriever-server build --corpus {tmp_path}/wiki-18.jsonl --encoder intfloat/e5-base-v2 "
        f"--index-type ivfpq --batch-size 512 --out {tmp_path}/index-e5-ivfpq --delete-shards"
    )
    assert "GPU-hours" in own.stderr and "~18 GB" in own.stderr


def test_older_huggingface_cli_is_used_when_hf_is_missing(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "huggingface-cli").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "huggingface-cli").chmod(0o755)
    done = _script("--dry-run", "--out", str(tmp_path / "x"), path=f"{bin_dir}:{BARE_PATH}")
    assert done.stdout.startswith("huggingface-cli download PeterJinGo/wiki-18-corpus")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--out DIR is required"),
        (("--out", "x", "--index", "ivf"), "--index must be flat, hnsw or none"),
        (("--out", "x", "--build", "ivfpq", "--index", "flat"), "drop --index flat"),
        (("--out", "x", "--bogus"), "unknown argument --bogus"),
    ],
)
def test_bad_arguments_exit_2(args: tuple[str, ...], message: str) -> None:
    done = _script("--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr


def test_missing_tools_are_named_outside_dry_run(tmp_path: Path) -> None:
    done = _script("--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "pip install -U huggingface_hub" in done.stderr


# ---- a real run: `hf` replaced by a copy from a local directory laid out like the hub --------------

FAKE_HF = """#!/usr/bin/env bash
# Stand-in for `hf download REPO [FILE] --repo-type dataset [--include GLOB] --local-dir DIR`.
set -euo pipefail
[[ $1 == download ]] || exit 2
repo=$2; shift 2; files=(); include=""; dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --local-dir) dir=$2; shift 2 ;;
    --include) include=$2; shift 2 ;;
    --repo-type) shift 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
echo "$repo" >> "$FAKE_HUB/calls"
mkdir -p "$dir"
if [[ ${#files[@]} -gt 0 ]]; then
  for f in "${files[@]}"; do cp "$FAKE_HUB/$repo/$f" "$dir/"; done
else
  cp "$FAKE_HUB/$repo"/$include "$dir/"
fi
"""


def test_real_run_downloads_joins_and_imports(
    wiki200_corpus: Path, wiki200_flat_index: Path, tmp_path: Path
) -> None:
    hub, bin_dir, out = tmp_path / "hub", tmp_path / "bin", tmp_path / "wiki18"
    corpus_repo, index_repo = hub / "PeterJinGo" / "wiki-18-corpus", hub / "PeterJinGo" / "wiki-18-e5-index"
    corpus_repo.mkdir(parents=True)
    index_repo.mkdir(parents=True)
    (corpus_repo / "wiki-18.jsonl.gz").write_bytes(gzip.compress(wiki200_corpus.read_bytes()))
    # The "prebuilt" index: our own MiniLM vectors in a FAISS flat file, stored in two parts like the hub's.
    vectors = np.concatenate([np.load(p) for p in sorted((wiki200_flat_index / "embeddings").glob("*.npy"))])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    whole = faiss.serialize_index(index).tobytes()
    (index_repo / "part_aa").write_bytes(whole[: len(whole) // 2])
    (index_repo / "part_ab").write_bytes(whole[len(whole) // 2 :])
    bin_dir.mkdir()
    (bin_dir / "hf").write_text(FAKE_HF)
    (bin_dir / "hf").chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:{BARE_PATH}"  # the venv's retriever-server

    args = ("--out", str(out), "--encoder", "embedded", "--", "--no-progress")
    done = _script(*args, path=path, FAKE_HUB=str(hub))
    assert done.returncode == 0, done.stderr
    assert (out / "wiki-18.jsonl").read_bytes() == wiki200_corpus.read_bytes()
    assert (out / "e5_Flat.index").read_bytes() == whole
    assert not (out / "parts" / "wiki-18-e5-index").exists() and not (out / "wiki-18.jsonl.gz").exists()
    manifest = read_manifest(out / "index-e5-flat")
    assert manifest["corpus"]["passages"] == 200 and manifest["index"]["imported"]["mode"] == "hardlink"
    assert (hub / "calls").read_text().split() == ["PeterJinGo/wiki-18-corpus", "PeterJinGo/wiki-18-e5-index"]

    again = _script(*args, path=path, FAKE_HUB=str(hub))
    assert again.returncode == 0, again.stderr
    assert len((hub / "calls").read_text().split()) == 2  # nothing downloaded twice
    assert "up to date" in again.stdout
    shutil.rmtree(out)

"""Paths of the data the tests read (all inside the repository)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "data" / "demo"
DEMO_CORPUS = DEMO_DIR / "corpus.jsonl"
WIKI18_SAMPLE = DEMO_DIR / "wiki18_sample.jsonl"
HOTPOTQA_DEV = DEMO_DIR / "hotpotqa_dev.jsonl"
SYNTHETIC_DIR = REPO_ROOT / "data" / "synthetic"
MULTIHOP_DIR = REPO_ROOT / "data" / "synthetic_multihop"
QWEN_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
SMOLLM2_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "smollm2-tokenizer"
# The converted SmolLM2 (`autorefine fetch-model`), kept between test sessions: CI converts it once.
SMOLLM2_CACHE = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"

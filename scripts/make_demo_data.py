"""Build data/demo/ and the test tokenizer fixture from a local copy of the shared source data.

Run once by maintainers (users get the result in the repository):

    python scripts/make_demo_data.py --shared ../shared/data

Writes:
    data/demo/corpus.jsonl              distinct paragraphs of the 500 HotpotQA dev questions (FlashRAG format)
    data/demo/hotpotqa_train.jsonl      400 of those questions   {id, question, golden_answers, metadata}
                                        (metadata: supporting_titles, and evidence: the supporting paragraphs)
    data/demo/hotpotqa_dev.jsonl        the other 100
    data/demo/benchmarks/<name>.jsonl   500-question samples of the seven QA benchmarks (copied as they are)
    data/demo/wiki18_sample.jsonl       1,000 wiki-18 passages (copied as they are)
    data/tokenizers/qwen2.5/           the real Qwen2.5 tokenizer files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
DEV_QUESTIONS = 100


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines (UTF-8, non-ASCII kept)."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_hotpotqa(source: Path, out: Path) -> None:
    """Corpus of distinct (title, paragraph) pairs plus the questions, split by a stable hash of the id."""
    passages: dict[tuple[str, str], str] = {}
    questions = []
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        supporting, evidence = [], []
        for ctx in row["contexts"]:
            key = (ctx["title"], ctx["paragraph_text"])
            passages.setdefault(key, str(len(passages)))
            if ctx["is_supporting"]:
                supporting.append(ctx["title"])
                # The gold evidence of the process score: each supporting paragraph, whitespace collapsed.
                evidence.append({"title": ctx["title"], "text": " ".join(ctx["paragraph_text"].split())})
        answers = [span for obj in row["answers_objects"] for span in obj["spans"]]
        questions.append(
            {
                "id": f"hotpotqa-{row['question_id']}",
                "question": row["question_text"],
                "golden_answers": answers,
                "metadata": {"supporting_titles": supporting, "evidence": evidence},
            }
        )
    corpus = [{"id": pid, "contents": f'"{title}"\n{text}'} for (title, text), pid in passages.items()]
    write_jsonl(out / "corpus.jsonl", corpus)
    # A hash split keeps membership stable if the source order ever changes.
    questions.sort(key=lambda q: hashlib.sha256(q["id"].encode()).hexdigest())
    write_jsonl(out / "hotpotqa_dev.jsonl", questions[:DEV_QUESTIONS])
    write_jsonl(out / "hotpotqa_train.jsonl", questions[DEV_QUESTIONS:])
    print(
        f"corpus: {len(corpus)} passages; questions: {len(questions) - DEV_QUESTIONS} train / {DEV_QUESTIONS} dev"
    )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    src: Path = args.shared
    out = REPO / "data" / "demo"
    (out / "benchmarks").mkdir(parents=True, exist_ok=True)

    build_hotpotqa(src / "hotpotqa_dev_ircot500" / "dev_subsampled.jsonl", out)
    for name in BENCHMARKS:
        shutil.copyfile(src / "benchmarks" / f"{name}.jsonl", out / "benchmarks" / f"{name}.jsonl")
    shutil.copyfile(src / "wiki18_sample" / "sample_data.jsonl", out / "wiki18_sample.jsonl")

    tok_out = REPO / "data" / "tokenizers" / "qwen2.5"
    tok_out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / "tokenizers" / "qwen2.5" / name, tok_out / name)

    for path in sorted(out.rglob("*.jsonl")) + sorted(tok_out.iterdir()):
        print(f"{sha256(path)}  {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()

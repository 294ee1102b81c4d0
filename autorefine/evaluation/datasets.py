"""The seven QA benchmarks of Search-R1 / AutoRefine, and where their question files come from."""

from __future__ import annotations

from pathlib import Path

from autorefine.data import DataError, find_split_file, load_hub_split, split_file_candidates

SINGLE_HOP = ("nq", "triviaqa", "popqa")
MULTI_HOP = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
BENCHMARKS = SINGLE_HOP + MULTI_HOP
# Papers report test numbers where a test split has gold answers (NQ, TriviaQA, PopQA, Bamboogle), dev otherwise.
EVAL_SPLITS = ("test", "dev")
GROUPS = {"single_hop": SINGLE_HOP, "multi_hop": MULTI_HOP}


def parse_dataset_specs(text: str) -> list[tuple[str, Path | None]]:
    """`nq,hotpotqa` or `all` or `name=path.jsonl` items → (name, explicit file or None), duplicates refused."""
    specs: list[tuple[str, Path | None]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "all":
            specs += [(name, None) for name in BENCHMARKS]
            continue
        name, sep, path = item.partition("=")
        if not name or (sep and not path):
            raise DataError(f"--datasets: {item!r} is neither a dataset name nor NAME=PATH")
        specs.append((name, Path(path) if sep else None))
    names = [name for name, _ in specs]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"--datasets names {', '.join(duplicates)} more than once")
    if not specs:
        raise DataError("--datasets is empty")
    return specs


def resolve_question_file(name: str, data_dir: Path | None, cache_dir: Path) -> Path:
    """The evaluation file of one dataset: test, else dev, from `data_dir` when given, else from the hub."""
    if data_dir is not None:
        found = find_split_file(data_dir, name, EVAL_SPLITS, unsplit=True)
        if found is None:
            tried = ", ".join(
                str(p) for p in split_file_candidates(data_dir, name, EVAL_SPLITS, unsplit=True)
            )
            known = "" if name in BENCHMARKS else f" ('{name}' is none of {', '.join(BENCHMARKS)})"
            raise DataError(f"no question file for {name} in {data_dir}{known}; looked for {tried}")
        return found
    errors = []
    for split in EVAL_SPLITS:
        try:
            return load_hub_split(name, split, cache_dir)
        except DataError as err:
            errors.append(str(err))
    raise DataError(f"no test or dev split of {name}: " + " | ".join(errors))


def resolve_datasets(text: str, data_dir: Path | None, cache_dir: Path) -> dict[str, Path]:
    """Dataset name → question file, in the order given."""
    return {
        name: path if path is not None else resolve_question_file(name, data_dir, cache_dir)
        for name, path in parse_dataset_specs(text)
    }

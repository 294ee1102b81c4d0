"""Gold-like trajectories for the SFT warm start, played through the real agent loop.

A `TeacherEngine` stands in for the policy and writes scripted turns; the agent loop around it searches the
real retriever and inserts the real documents. SFT traces therefore have exactly the token layout and
environment masks of RL rollouts: the same code builds both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorefine import protocol
from autorefine.data import Question
from autorefine.rewards import normalize_answer
from autorefine.rollout.agent import AgentLoop, RolloutConfig, Searcher
from autorefine.rollout.engine import Generation, SamplingParams
from autorefine.rollout.trajectory import FinishReason, Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TurnWriter = Callable[[Question, str], str]

_DOC_LINE = re.compile(r"^Doc \d+\(Title: (?P<title>.*?)\) (?P<text>.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def search_turn(question: Question) -> str:
    """First gold turn: think, then search for the question itself."""
    return (
        "<think> I will search for the missing facts. </think>\n"
        f"<search> {protocol.normalize_question(question.question)} </search>"
    )


def evidence_sentences(documents_text: str, golds: Sequence[str], limit: int = 2) -> list[str]:
    """Sentences of the retrieved passages that contain a gold answer, in passage order."""
    wanted = [g for g in (normalize_answer(gold) for gold in golds) if g]
    found = []
    for line in documents_text.splitlines():
        match = _DOC_LINE.match(line.strip())
        if not match:
            continue
        for sentence in _SENTENCE_END.split(match["text"]):
            normalized = normalize_answer(sentence)
            if any(g in normalized for g in wanted) and sentence not in found:
                found.append(sentence.strip())
    return found[:limit]


def answer_turn(question: Question, documents_text: str) -> str:
    """Second gold turn: refine the evidence found in the documents, then answer."""
    evidence = " ".join(evidence_sentences(documents_text, question.golden_answers))
    refine = evidence or "The passages do not state the answer."
    return f"<refine> {refine} </refine>\n<answer> {question.golden_answers[0]} </answer>"


def gold_turn(question: Question, completion_text: str) -> str:
    """The next gold turn given what the trajectory holds so far."""
    if "<documents>" not in completion_text:
        return search_turn(question)
    return answer_turn(question, completion_text.rsplit("<documents>", 1)[1])


class TeacherEngine:
    """A `GenerationEngine` that writes scripted turns instead of sampling them."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompts: dict[tuple[int, ...], Question], writer: TurnWriter
    ):
        self.tokenizer = tokenizer
        self.writer = writer
        self.set_prompts(prompts)

    def set_prompts(self, prompts: dict[tuple[int, ...], Question]) -> None:
        """The questions behind the prompt ids this engine will be asked to continue."""
        self.prompts = prompts
        self._prompt_lengths = sorted({len(p) for p in prompts}, reverse=True)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[Generation]:
        """The scripted next turn of every trajectory, cut to its token budget."""
        out = []
        for context, budget in zip(prompts, max_new_tokens, strict=True):
            question, length = self._question_of(context)
            text = self.writer(question, self.tokenizer.decode(context[length:], skip_special_tokens=True))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            finish = "stop" if len(ids) <= budget else "length"
            out.append(Generation(ids[:budget], [0.0] * min(len(ids), budget), finish))
        return out

    def _question_of(self, context: Sequence[int]) -> tuple[Question, int]:
        for length in self._prompt_lengths:
            question = self.prompts.get(tuple(context[:length]))
            if question is not None:
                return question, length
        raise KeyError("context does not start with any known prompt")


def build_gold_traces(
    questions: Sequence[Question],
    searcher: Searcher,
    tokenizer: PreTrainedTokenizerBase,
    config: RolloutConfig,
    template: protocol.PromptTemplate,
    *,
    require_evidence: bool = True,
    batch_size: int = 64,
) -> list[tuple[Question, Trajectory]]:
    """Gold traces for `questions`; with `require_evidence`, only those whose documents contain a gold answer."""
    engine = TeacherEngine(tokenizer, {}, gold_turn)
    loop = AgentLoop(engine, searcher, config, template)
    out = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        prompt_ids = [loop.prompt_ids(q.question) for q in batch]
        engine.set_prompts({tuple(p): q for p, q in zip(prompt_ids, batch, strict=True)})
        for question, trajectory in zip(
            batch, loop.run_prompt_ids(prompt_ids, SamplingParams()), strict=True
        ):
            if trajectory.finish_reason != FinishReason.ANSWER:
                continue
            if require_evidence and not evidence_sentences(
                trajectory.documents_text, question.golden_answers
            ):
                continue
            out.append((question, trajectory))
    return out


def save_trajectories(path: Path, rows: Iterable[tuple[str, Trajectory, dict[str, Any]]]) -> int:
    """Write (id, trajectory, extra fields) as JSONL with exact ids and masks, for later SFT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for qid, t, extra in rows:
            record = {
                "id": qid,
                "prompt_ids": t.prompt_ids,
                "completion_ids": t.completion_ids,
                "env_mask": t.env_mask,
            }
            f.write(json.dumps({**record, **extra}) + "\n")
            count += 1
    return count


def load_trajectory_rows(path: Path) -> list[dict[str, Any]]:
    """Rows written by `save_trajectories`, checked for consistent lengths."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = len(row["completion_ids"]) == len(row["env_mask"]) and isinstance(row["prompt_ids"], list)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a trajectory row ({err})") from None
        if not ok:
            raise ValueError(f"{path}:{number}: completion_ids and env_mask differ in length")
        rows.append(row)
    return rows

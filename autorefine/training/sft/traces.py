"""Gold-like trajectories for the SFT warm start, played through the real agent loop.

A `TeacherEngine` stands in for the policy and writes scripted turns; the agent loop around it searches the
real retriever and inserts the real documents. SFT traces therefore have exactly the token layout and
environment masks of RL rollouts: the same code builds both.

A question without gold evidence gets one search for the question itself, then an answer. A question with
evidence (`metadata.evidence`) plays its evidence chain: one search per item (the item's title), a refine of
what that search returned about the item, and the answer after the last item. A chain of more items than the
rollout's searches (`max_turns`) could never reach its answer: such a question is traced as one without
evidence. A `TracePlan` scripts other chains (a repeated search, an early answer) for warm starts that should
leave room to improve.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorefine import protocol
from autorefine.data import Evidence, Question, question_evidence
from autorefine.rollout.agent import AgentLoop, RolloutSettings, Searcher
from autorefine.rollout.engine import Generation, SamplingParams
from autorefine.rollout.trajectory import FinishReason, Trajectory
from autorefine.scoring.answers import normalize_answer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TurnWriter = Callable[[Question, str], str]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
THINK_TURN = "<think> I will search for the missing facts. </think>\n"


def search_turn(question: Question) -> str:
    """First gold turn: think, then search for the question itself."""
    return THINK_TURN + f"<search> {protocol.normalize_question(question.question)} </search>"


def evidence_sentences(documents_text: str, golds: Sequence[str], limit: int = 2) -> list[str]:
    """Sentences of the retrieved passages that contain a gold answer, in passage order."""
    wanted = [g for g in (normalize_answer(gold) for gold in golds) if g]
    found = []
    for sentence in document_sentences(documents_text):
        normalized = normalize_answer(sentence)
        if any(g in normalized for g in wanted) and sentence not in found:
            found.append(sentence)
    return found[:limit]


def document_sentences(documents_text: str) -> list[str]:
    """Sentences of the passages in a documents block, in passage order."""
    return [
        sentence.strip()
        for _, text in protocol.parse_documents(documents_text)
        for sentence in _SENTENCE_END.split(text)
        if sentence.strip()
    ]


def answer_turn(question: Question, documents_text: str) -> str:
    """Second gold turn: refine the evidence found in the documents, then answer."""
    evidence = " ".join(evidence_sentences(documents_text, question.golden_answers))
    refine = evidence or "The passages do not state the answer."
    return f"<refine> {refine} </refine>\n<answer> {question.golden_answers[0]} </answer>"


def item_sentences(documents_text: str, item: Evidence, golds: Sequence[str], limit: int = 2) -> list[str]:
    """Sentences of the documents that belong to an evidence item, those stating its answer first.

    A sentence belongs to the item when the item's text contains it; the answer is the item's own, else `golds`.
    Without such a sentence, sentences that state the answer anywhere in the documents are used.
    """
    answers = [a for a in (normalize_answer(x) for x in ([item.answer] if item.answer else golds)) if a]
    sentences = list(dict.fromkeys(document_sentences(documents_text)))
    belonging = _belonging(sentences, item)
    stating = [s for s in sentences if any(a in normalize_answer(s) for a in answers)]
    ranked = [s for s in belonging if s in stating] + [s for s in belonging if s not in stating]
    return (ranked or stating)[:limit]


def _belonging(sentences: Sequence[str], item: Evidence) -> list[str]:
    item_text = normalize_answer(item.text)
    return [s for s in sentences if (normalized := normalize_answer(s)) and normalized in item_text]


@dataclass(frozen=True)
class TracePlan:
    """A scripted chain: the evidence item searched at each step (by its title), then the final answer."""

    searches: tuple[Evidence, ...]
    answer: str

    def __post_init__(self) -> None:
        if not self.searches:
            raise ValueError("a trace plan needs at least one search")

    @classmethod
    def gold(cls, question: Question) -> TracePlan:
        """Each evidence item once, in order, then the first gold answer."""
        return cls(tuple(question_evidence(question)), question.golden_answers[0])


def plan_turn(plan: TracePlan, question: Question, completion_text: str) -> str:
    """The next turn of `plan`: refine what the last search returned, then search the next item or answer."""
    blocks = completion_text.split("<documents>")
    done = len(blocks) - 1  # searches run so far
    if done == 0:
        return THINK_TURN + f"<search> {plan.searches[0].title} </search>"
    searched = plan.searches[done - 1]
    found = item_sentences(blocks[-1], searched, question.golden_answers)
    refine = f"<refine> {' '.join(found) or 'The passages do not state it.'} </refine>\n"
    if done < len(plan.searches):
        return refine + f"<search> {plan.searches[done].title} </search>"
    return refine + f"<answer> {plan.answer} </answer>"


def gold_turn(question: Question, completion_text: str) -> str:
    """The next gold turn given what the trajectory holds so far: the evidence chain when the question has one."""
    if question.metadata.get("evidence"):
        return plan_turn(TracePlan.gold(question), question, completion_text)
    if "<documents>" not in completion_text:
        return search_turn(question)
    return answer_turn(question, completion_text.rsplit("<documents>", 1)[1])


def planned_turns(plans: dict[str, TracePlan]) -> TurnWriter:
    """A writer following `plans[question.id]` (the gold turn for questions without a plan)."""

    def write(question: Question, completion_text: str) -> str:
        plan = plans.get(question.id)
        return (
            gold_turn(question, completion_text)
            if plan is None
            else plan_turn(plan, question, completion_text)
        )

    return write


def retrieved_evidence(trajectory: Trajectory, question: Question) -> bool:
    """Whether the documents hold a sentence of every evidence item (without evidence: one stating the answer)."""
    items = question_evidence(question)
    if not items:
        return bool(evidence_sentences(trajectory.documents_text, question.golden_answers))
    sentences = document_sentences(trajectory.documents_text)
    return all(_belonging(sentences, item) for item in items)


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
            # Teacher turns copy document sentences and gold answers: untrusted text, as the documents are.
            ids = protocol.encode_text(self.tokenizer, text)
            finish = "stop" if len(ids) <= budget else "length"
            out.append(Generation(ids[:budget], [0.0] * min(len(ids), budget), finish))
        return out

    def _question_of(self, context: Sequence[int]) -> tuple[Question, int]:
        for length in self._prompt_lengths:
            question = self.prompts.get(tuple(context[:length]))
            if question is not None:
                return question, length
        raise KeyError("context does not start with any known prompt")


def within_search_budget(question: Question, max_turns: int) -> Question:
    """`question` as traced under `max_turns` searches: without its evidence when the chain needs more."""
    if len(question_evidence(question)) <= max_turns:
        return question
    metadata = {key: value for key, value in question.metadata.items() if key != "evidence"}
    return dataclasses.replace(question, metadata=metadata)


def build_gold_traces(
    questions: Sequence[Question],
    searcher: Searcher,
    tokenizer: PreTrainedTokenizerBase,
    config: RolloutSettings,
    template: protocol.PromptTemplate,
    *,
    require_evidence: bool = True,
    batch_size: int = 64,
    writer: TurnWriter = gold_turn,
) -> list[tuple[Question, Trajectory]]:
    """Traces of `writer` (gold by default) that end with an answer; `require_evidence`: `retrieved_evidence` too."""
    engine = TeacherEngine(tokenizer, {}, writer)
    loop = AgentLoop(engine, searcher, config, template)
    out = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        played = [within_search_budget(q, config.max_turns) for q in batch]
        prompt_ids = [loop.prompt_ids(q.question) for q in batch]
        engine.set_prompts({tuple(p): q for p, q in zip(prompt_ids, played, strict=True)})
        trajectories = loop.run_prompt_ids(prompt_ids, SamplingParams())
        for question, as_played, trajectory in zip(batch, played, trajectories, strict=True):
            if trajectory.finish_reason != FinishReason.ANSWER:
                continue
            if require_evidence and not retrieved_evidence(trajectory, as_played):
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

"""The process score of a trajectory: TeaRAG's knowledge sufficiency, per search step.

For each gold evidence item of the question and each of three channels, the item's best similarity at any
search step:

- query: the step's search query (model text), by how much of the item it asks for;
- documents: each passage the search returned (environment text), by how much of the item it holds;
- refine: each `<refine>` block the model wrote after reading those documents, before the next search, by
  how well it states one fact of the item *and little else* (a distillation, not a copy: see below).

An item's coverage is the best weighted channel, `max(w_query·query, w_documents·documents, w_refine·refine)`,
with weights 0.5 / 0.5 / 1.0 by default: stating the evidence in a refine earns full credit, asking for it or
merely having it retrieved earns at most half. Coverage is summed over the items and divided by the number of
searches: one item gathered per search scores 1, repeating a search cannot raise coverage but enlarges the
denominator (the score is not capped at 1: two items found by one search score 2). Questions without evidence score answer F1 / searches. A trajectory that ran no search scores its
answer F1 on every question, with or without evidence: what it knew without searching was sufficient exactly
when the answer is right, so NQ-like and HotpotQA-like questions teach the same thing about not searching.

Refines are matched sentence by sentence: an item's refine similarity is its best match over the item's
sentences (each read with the item's title). The lexical matcher takes an F-score of content words that
weighs precision over recall (beta 0.5), so a refine that states one sentence's fact, or part of it, scores
well while pasting a five-sentence passage scores little (its precision against any one sentence is low);
the dense matcher takes the cosine, discounted when the refine is more
than twice the sentence's length. docs/process-score.md works an example through.

Documents enter only through their own channel. Outcome (answer F1) and format read the answer and blocks
the agent loop accepted from model turns (`autorefine.scoring.reward`), so text inside a passage, such as
`<answer>X</answer>` or a copy of the evidence in `<refine>` tags, changes neither of them nor the query and
refine channels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from autorefine.data import Evidence, Question, question_evidence
from autorefine.protocol import parse_documents, strip_documents
from autorefine.scoring.answers import normalize_answer

if TYPE_CHECKING:
    from autorefine.rollout.trajectory import Trajectory


Channel = Literal["query", "documents", "refine"]
CHANNELS: tuple[Channel, ...] = ("query", "documents", "refine")
SimilarityBlock = tuple[Sequence[Evidence], Sequence[str]]
# A refine may be this many times as long as the evidence sentence it states before its credit shrinks.
REFINE_LENGTH_ALLOWANCE = 1.0


class Matcher(Protocol):
    """Similarity in [0, 1] between gold evidence items and pieces of trajectory text."""

    name: str

    def similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """`[block][item][text]`: how much of each item each text holds (queries, passages)."""
        ...

    def refine_similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """`[block][item][refine]`: how well each refine states one fact of the item, and little else."""
        ...


# Function words carry no evidence; without them a query cannot match a passage by sharing "is" and "of".
_FUNCTION_WORDS = """
a an the of in on at to for from by with as and or but not no is are was were be been being has have had do
does did what which who whom whose where when why how that this these those it its he she they his her their
there than then so if
"""
_STOPWORDS = frozenset(_FUNCTION_WORDS.split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def content_tokens(text: str) -> frozenset[str]:
    """Answer-normalized words of `text` without function words."""
    return frozenset(normalize_answer(text).split()) - _STOPWORDS


def evidence_text(item: Evidence) -> str:
    """The text an item is matched as: its title and its text."""
    return f"{item.title}: {item.text}" if item.title else item.text


def evidence_facts(item: Evidence) -> list[str]:
    """The item's sentences, each read with its title: the facts a refine may state."""
    sentences = [s.strip() for s in _SENTENCE_END.split(item.text) if s.strip()] or [item.text]
    return [f"{item.title}: {s}" if item.title else s for s in sentences]


# A refine should state nothing the evidence does not (precision) more than everything it does (recall):
# F-beta with beta 0.5 weighs precision four times as much.
REFINE_BETA = 0.5


def brevity(refine: str, fact: str) -> float:
    """1 for a refine no longer than the fact it states (times the allowance), shrinking as it grows beyond."""
    return min(1.0, REFINE_LENGTH_ALLOWANCE * len(fact.split()) / max(1, len(refine.split())))


def refine_f_score(refine: frozenset[str], fact: frozenset[str]) -> float:
    """F-beta (beta 0.5) of a refine's content words against a fact's."""
    common = len(refine & fact)
    if not common:
        return 0.0
    precision, recall = common / len(refine), common / len(fact)
    b2 = REFINE_BETA**2
    return (1 + b2) * precision * recall / (b2 * precision + recall)


class LexicalMatcher:
    """Content-word overlap with an item: deterministic, CPU, no model.

    Queries and passages score the share of the item's content words (title and text) they hold; refines
    score the F-beta (beta 0.5) of content words against the item's best-matching sentence.
    """

    name = "lexical"

    def similarity(self, evidence: Sequence[Evidence], texts: Sequence[str]) -> list[list[float]]:
        """`[item][text]` of one block (see `similarity_blocks`)."""
        return self.similarity_blocks([(evidence, texts)])[0]

    def similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """Recall of each item's content words in each text."""
        out = []
        for evidence, texts in blocks:
            have = [content_tokens(text) for text in texts]
            rows = []
            for item in evidence:
                wanted = content_tokens(evidence_text(item))
                rows.append([len(wanted & h) / len(wanted) if wanted else 0.0 for h in have])
            out.append(rows)
        return out

    def refine_similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """F-beta (beta 0.5) of each refine's content words against the item's best-matching sentence."""
        out = []
        for evidence, refines in blocks:
            have = [(refine, content_tokens(refine)) for refine in refines]
            rows = []
            for item in evidence:
                facts = [(fact, content_tokens(fact)) for fact in evidence_facts(item)]
                rows.append(
                    [
                        max(
                            refine_f_score(words, fact_words) * brevity(refine, fact)
                            for fact, fact_words in facts
                        )
                        for refine, words in have
                    ]
                )
            out.append(rows)
        return out


class EmbeddingMatcher:
    """Cosine similarity (clipped at 0) of dense embeddings; default the embedded all-MiniLM-L6-v2 (offline).

    Queries and passages score their cosine with the whole item; a refine scores its cosine with the item's
    best-matching sentence, times min(1, 2 × that sentence's words / the refine's words): a dense encoder
    barely tells a passage from one of its own sentences, so length is what separates stating a fact from
    pasting the passage around it. The encoder comes from the retriever package's public
    `load_passage_encoder` (in this process: the trainer's searches still go over HTTP), loaded on first use;
    every distinct string of a call is embedded once, in one batch.
    """

    def __init__(
        self, encoder: str | None = None, *, device: str | None = None, batch_size: int = 64
    ) -> None:
        from retriever_server.embedding import encoder_name

        self.encoder_name = encoder
        self.name = f"embedding:{encoder_name(encoder)}"
        self.device = device
        self.batch_size = batch_size
        self._encoder = None

    @property
    def encoder(self):  # -> retriever_server.embedding.PassageEncoder
        """The passage encoder, loaded on first use."""
        if self._encoder is None:
            from retriever_server.embedding import load_passage_encoder

            self._encoder = load_passage_encoder(
                self.encoder_name, device=self.device, batch_size=self.batch_size
            )
        return self._encoder

    def _embed(self, strings: Sequence[str]):  # -> dict[str, np.ndarray]
        distinct = list(dict.fromkeys(strings))
        if not distinct:
            return {}
        return dict(zip(distinct, self.encoder.encode_passages(distinct), strict=True))

    def similarity(self, evidence: Sequence[Evidence], texts: Sequence[str]) -> list[list[float]]:
        """`[item][text]` of one block (see `similarity_blocks`)."""
        return self.similarity_blocks([(evidence, texts)])[0]

    def similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """Clipped cosine of each item (title and text) with each text."""
        vectors = self._embed(
            [evidence_text(i) for ev, _ in blocks for i in ev] + [t for _, ts in blocks for t in ts]
        )
        return [
            [[_cosine(vectors[evidence_text(item)], vectors[text]) for text in texts] for item in evidence]
            for evidence, texts in blocks
        ]

    def refine_similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """Clipped cosine of each refine with the item's best-matching sentence, discounted for length."""
        facts = {id(item): evidence_facts(item) for evidence, _ in blocks for item in evidence}
        vectors = self._embed([f for fs in facts.values() for f in fs] + [r for _, rs in blocks for r in rs])
        out = []
        for evidence, refines in blocks:
            rows = []
            for item in evidence:
                rows.append(
                    [
                        max(
                            _cosine(vectors[fact], vectors[refine]) * brevity(refine, fact)
                            for fact in facts[id(item)]
                        )
                        for refine in refines
                    ]
                )
            out.append(rows)
        return out


def _cosine(left, right) -> float:  # unit vectors (the encoder normalizes)
    return float(min(1.0, max(0.0, float(left @ right))))


def build_matcher(spec: str) -> Matcher:
    """`lexical`, `embedding` (the embedded MiniLM) or `embedding:<model name or path>`."""
    kind, _, model = spec.partition(":")
    if kind == "lexical" and not model:
        return LexicalMatcher()
    if kind == "embedding":
        return EmbeddingMatcher(model or None)
    raise ValueError(f"unknown matcher {spec!r}: use 'lexical', 'embedding' or 'embedding:<model>'")


@dataclass(frozen=True)
class ChannelWeights:
    """How much each channel can contribute to an item's coverage (each in [0, 1])."""

    query: float = 0.5
    documents: float = 0.5
    refine: float = 1.0

    def __post_init__(self) -> None:
        for channel in CHANNELS:
            if not 0.0 <= getattr(self, channel) <= 1.0:
                raise ValueError(f"channel weight {channel} must be in [0, 1], got {getattr(self, channel)}")


@dataclass(frozen=True)
class ProcessScore:
    """The process score of one trajectory and where its evidence coverage came from."""

    process: float  # coverage / searches; answer F1 / searches without evidence; answer F1 without search
    coverage: float  # summed over evidence items: each item's best weighted channel (0 without evidence)
    steps: int  # searches run
    evidence_items: int = 0
    # Sums over items of each channel's best (unweighted) match, to see where coverage came from.
    query_coverage: float = 0.0
    documents_coverage: float = 0.0
    refine_coverage: float = 0.0


def step_texts(trajectory: Trajectory) -> list[tuple[Channel, str]]:
    """Every piece of text the channels match against: queries, returned passages, refines."""
    out: list[tuple[Channel, str]] = []
    for step in trajectory.steps:
        out.append(("query", step.query))
        passages = parse_documents(step.documents)
        if passages:
            out += [("documents", f"{title}: {text}" if title else text) for title, text in passages]
        elif block := " ".join(strip_documents(step.documents).split()):
            out.append(("documents", block))  # not in the `Doc i(Title: …)` layout: the block as one text
        out += [("refine", refine) for refine in step.refines if refine]
    return out


def process_scores(
    trajectories: Sequence[Trajectory],
    questions: Sequence[Question],
    outcomes: Sequence[float],
    matcher: Matcher,
    weights: ChannelWeights = ChannelWeights(),
) -> list[ProcessScore]:
    """Process score of each trajectory against its question (`outcomes`: the answer scores, used without
    evidence and without search); the matcher is called once per channel kind for the whole batch."""
    if not len(trajectories) == len(questions) == len(outcomes):
        raise ValueError(
            f"{len(trajectories)} trajectories, {len(questions)} questions and {len(outcomes)} outcomes"
        )
    evidence = [question_evidence(q) for q in questions]
    found = [step_texts(t) if items else [] for t, items in zip(trajectories, evidence, strict=True)]
    read = [[text for channel, text in f if channel != "refine"] for f in found]
    written = [[text for channel, text in f if channel == "refine"] for f in found]
    read_sim = iter(
        matcher.similarity_blocks([(e, r) for e, r in zip(evidence, read, strict=True) if e and r])
    )
    refine_sim = iter(
        matcher.refine_similarity_blocks([(e, w) for e, w in zip(evidence, written, strict=True) if e and w])
    )
    out = []
    for trajectory, items, texts, refines, outcome in zip(
        trajectories, evidence, found, written, outcomes, strict=True
    ):
        steps = trajectory.num_searches
        kinds = [channel for channel, _ in texts if channel != "refine"]
        read_rows = next(read_sim) if items and kinds else [[] for _ in items]
        refine_rows = next(refine_sim) if items and refines else [[] for _ in items]
        best = {
            channel: [
                max((s for k, s in zip(kinds, row, strict=True) if k == channel), default=0.0)
                for row in read_rows
            ]
            for channel in ("query", "documents")
        }
        best["refine"] = [max(row, default=0.0) for row in refine_rows]
        per_item = [max(getattr(weights, c) * best[c][i] for c in CHANNELS) for i in range(len(items))]
        coverage = sum(per_item)
        # Without search, knowledge came from the model itself: sufficient exactly when the answer is right.
        process = outcome if steps == 0 else (coverage if items else outcome) / steps
        out.append(
            ProcessScore(
                process=process,
                coverage=coverage,
                steps=steps,
                evidence_items=len(items),
                query_coverage=sum(best["query"]),
                documents_coverage=sum(best["documents"]),
                refine_coverage=sum(best["refine"]),
            )
        )
    return out

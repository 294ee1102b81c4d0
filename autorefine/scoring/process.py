"""The process score of a trajectory: TeaRAG's knowledge sufficiency, per search step.

For each gold evidence item of the question and each of three channels, the item's best similarity at any
search step:

- query: the step's search query (model text);
- documents: each passage the search returned (environment text);
- refine: each `<refine>` block the model wrote after reading those documents, before the next search.

An item's coverage is the best weighted channel, `max(w_query·query, w_documents·documents, w_refine·refine)`,
with weights 0.5 / 0.5 / 1.0 by default: stating the evidence in a refine earns full credit, asking for it or
merely having it retrieved earns at most half. Coverage is summed over the items and divided by the number
of searches (at least 1): repeating a search cannot raise coverage but enlarges the denominator. The score is
not capped at 1 (two items found by one search score 2). Questions without evidence use F1 / searches.

Documents enter only through their own channel. Outcome (answer F1) and format read the answer and blocks
the agent loop accepted from model turns (`autorefine.scoring.reward`), so text inside a passage, such as
`<answer>X</answer>` or a copy of the evidence in `<refine>` tags, changes neither of them nor the query and
refine channels.
"""

from __future__ import annotations

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


class Matcher(Protocol):
    """Similarity in [0, 1] between gold evidence items and pieces of trajectory text."""

    name: str

    def similarity(self, evidence: Sequence[Evidence], texts: Sequence[str]) -> list[list[float]]:
        """`[item][text]` similarities."""
        ...

    def similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """`similarity` of many (evidence, texts) blocks in one call (one encoder pass for a dense matcher)."""
        ...


# Function words carry no evidence; without them a query cannot match a passage by sharing "is" and "of".
_FUNCTION_WORDS = """
a an the of in on at to for from by with as and or but not no is are was were be been being has have had do
does did what which who whom whose where when why how that this these those it its he she they his her their
there than then so if
"""
_STOPWORDS = frozenset(_FUNCTION_WORDS.split())


def content_tokens(text: str) -> frozenset[str]:
    """Answer-normalized words of `text` without function words."""
    return frozenset(normalize_answer(text).split()) - _STOPWORDS


def evidence_text(item: Evidence) -> str:
    """The text an item is matched as: its title and its text."""
    return f"{item.title}: {item.text}" if item.title else item.text


class LexicalMatcher:
    """Share of an item's content words (title and text) present in a text: deterministic, CPU, no model."""

    name = "lexical"

    def similarity(self, evidence: Sequence[Evidence], texts: Sequence[str]) -> list[list[float]]:
        """`[item][text]` recall of the item's content words."""
        text_tokens = [content_tokens(text) for text in texts]
        out = []
        for item in evidence:
            wanted = content_tokens(evidence_text(item))
            out.append([len(wanted & have) / len(wanted) if wanted else 0.0 for have in text_tokens])
        return out

    def similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """`similarity` per block."""
        return [self.similarity(evidence, texts) for evidence, texts in blocks]


class EmbeddingMatcher:
    """Cosine similarity (clipped at 0) of dense embeddings; default the embedded all-MiniLM-L6-v2 (offline).

    The encoder comes from the retriever package's public `load_passage_encoder` (in this process: the
    trainer's searches still go over HTTP) and is loaded on first use. Items and texts are embedded as
    passages, in batches, once per call.
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

    def similarity(self, evidence: Sequence[Evidence], texts: Sequence[str]) -> list[list[float]]:
        """`[item][text]` clipped cosine similarities."""
        return self.similarity_blocks([(evidence, texts)])[0]

    def similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """Every distinct string of every block is embedded once, in one batched encoder call."""
        import numpy as np

        strings: dict[str, int] = {}
        for evidence, texts in blocks:
            for text in [evidence_text(item) for item in evidence] + list(texts):
                strings.setdefault(text, len(strings))
        if not strings:
            return [[[] for _ in evidence] for evidence, _ in blocks]
        vectors = self.encoder.encode_passages(list(strings))
        out = []
        for evidence, texts in blocks:
            left = vectors[[strings[evidence_text(item)] for item in evidence]]
            right = vectors[[strings[text] for text in texts]]
            out.append(np.clip(left @ right.T, 0.0, 1.0).astype(float).tolist())
        return out


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

    process: float  # coverage / max(1, steps); outcome / max(1, steps) without evidence
    coverage: float  # summed best weighted matches over evidence items (0 without evidence)
    steps: int  # searches run
    evidence_items: int = 0
    # Unweighted sums over items of each channel's best match, to see where coverage came from.
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
    evidence); the matcher is called once for the whole batch."""
    if not len(trajectories) == len(questions) == len(outcomes):
        raise ValueError(
            f"{len(trajectories)} trajectories, {len(questions)} questions and {len(outcomes)} outcomes"
        )
    evidence = [question_evidence(q) for q in questions]
    texts = [step_texts(t) if items else [] for t, items in zip(trajectories, evidence, strict=True)]
    blocks = [(items, [text for _, text in found]) for items, found in zip(evidence, texts, strict=True)]
    matched = iter(matcher.similarity_blocks([b for b in blocks if b[0] and b[1]]))
    out = []
    for trajectory, items, found, outcome in zip(trajectories, evidence, texts, outcomes, strict=True):
        similarity = next(matched) if items and found else [[] for _ in items]
        steps = trajectory.num_searches
        best = {
            channel: [
                max((s for (c, _), s in zip(found, row, strict=True) if c == channel), default=0.0)
                for row in similarity
            ]
            for channel in CHANNELS
        }
        coverage = sum(
            max(getattr(weights, channel) * best[channel][i] for channel in CHANNELS)
            for i in range(len(items))
        )
        out.append(
            ProcessScore(
                process=(coverage if items else outcome) / max(1, steps),
                coverage=coverage,
                steps=steps,
                evidence_items=len(items),
                query_coverage=sum(best["query"]),
                documents_coverage=sum(best["documents"]),
                refine_coverage=sum(best["refine"]),
            )
        )
    return out

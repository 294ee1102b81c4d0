"""`autorefine infer`: one question through the agent loop, printed block by block, with ESC votes if asked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from autorefine.evaluation.esc import ESCResult, normalized, run_esc, run_sc
from autorefine.evaluation.runner import GREEDY, Decoding
from autorefine.protocol import ANSWER, DOCUMENTS, REFINE, SEARCH, THINK, split_blocks
from autorefine.rollout.agent import AgentLoop
from autorefine.rollout.trajectory import Segment, Trajectory

# One colour per block kind; labels repeat the kind so the blocks stay distinct without colour too.
BLOCK_STYLES = {
    THINK: "italic cyan",
    SEARCH: "bold yellow",
    REFINE: "green",
    ANSWER: "bold magenta",
    DOCUMENTS: "blue",
}


@dataclass
class InferenceResult:
    """The answer, the trajectory shown for it, and (for sc/esc) the vote that chose it."""

    answer: str | None
    trajectory: Trajectory
    vote: ESCResult[Trajectory] | None = None


def answer_question(loop: AgentLoop, question: str, decoding: Decoding) -> InferenceResult:
    """Run one question greedily, or vote over sampled trajectories (sc: all L; esc: windows until agreement)."""
    if decoding.mode == "greedy":
        [trajectory] = loop.run([question], GREEDY)
        return InferenceResult(trajectory.answer, trajectory)
    import torch

    torch.manual_seed(decoding.seed)

    def sample(indices: list[int]) -> list[Trajectory]:
        return loop.run([question] * len(indices), decoding.sampling)

    config = decoding.esc
    [vote] = run_esc(1, sample, config) if decoding.mode == "esc" else run_sc(1, sample, config.max_samples)
    shown = next((t for t in vote.samples if t.answer == vote.answer), vote.samples[0])
    return InferenceResult(vote.answer, shown, vote)


def _block(tag: str, body: str) -> Text:
    style = BLOCK_STYLES.get(tag, "")
    return Text.assemble((f"{tag:>8} │ ", f"bold {style}"), (body, style))


def render_segments(segments: Sequence[Segment]) -> list[Panel | Text]:
    """Renderables of a trajectory: model blocks as labelled lines, inserted text in panels."""
    out: list[Panel | Text] = []
    for segment in segments:
        if segment.kind == "model":
            for tag, body in split_blocks(segment.text):
                if tag is not None:
                    out.append(_block(tag, body))
                elif body.strip():
                    out.append(Text(f"{'text':>8} │ {body.strip()}", style="dim"))
        elif segment.kind in ("documents", "feedback"):
            # The environment's own tags are dropped: the panel title says what it is.
            pieces = split_blocks(segment.text)
            body = "\n".join(b.strip() for _, b in pieces if b.strip())
            if segment.kind == "documents":
                out.append(
                    Panel(body, title="documents", title_align="left", border_style="blue", style="dim")
                )
            else:
                out.append(
                    Panel(body, title="feedback: no usable action", title_align="left", border_style="red")
                )
    return out


def render_vote(vote: ESCResult[Trajectory], window: int) -> Group:
    """The votes per answer, the answers window by window, and when sampling stopped."""
    table = Table(title="votes", title_justify="left")
    table.add_column("answer (normalized)")
    table.add_column("votes", justify="right")
    winner = normalized(vote.answer)
    for answer, count in sorted(vote.votes.items(), key=lambda item: -item[1]):
        table.add_row(answer, str(count), style="bold magenta" if answer == winner else None)
    invalid = vote.samples_used - sum(vote.votes.values())
    if invalid:
        table.add_row("(no valid answer)", str(invalid), style="dim")
    answers = [s.answer for s in vote.samples]
    windows = [
        Text(f"window {i // window + 1}: " + " | ".join(str(a) for a in answers[i : i + window]), style="dim")
        for i in range(0, len(answers), window)
    ]
    if vote.stopped_early:
        how = f"stopped at window {vote.windows}: all {window} answers agree ({vote.samples_used} of {vote.max_samples} samples)"
    else:
        how = f"no window agreed: majority over {vote.samples_used} of {vote.max_samples} samples"
    return Group(table, *windows, Text(how, style="bold"))


def print_inference(console: Console, question: str, result: InferenceResult, decoding: Decoding) -> None:
    """Question, trajectory (the winning one for sc/esc), votes, and the answer."""
    console.print(Panel(question, title="question", title_align="left", border_style="white"))
    if result.vote is not None:
        console.print(Text("trajectory of the winning answer", style="bold"))
    for renderable in render_segments(result.trajectory.segments):
        console.print(renderable)
    searches = result.trajectory.num_searches
    console.print(Text(f"finish: {result.trajectory.finish_reason} · searches: {searches}", style="dim"))
    if result.vote is not None:
        console.print(
            render_vote(
                result.vote, decoding.esc.window if decoding.mode == "esc" else decoding.esc.max_samples
            )
        )
    console.print(
        Panel(
            Text(result.answer or "(no answer)", style=BLOCK_STYLES[ANSWER]),
            title="answer",
            title_align="left",
            border_style="magenta",
        )
    )

"""`autorefine infer`: block-by-block display of a trajectory, the ESC votes, and the command end to end."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from autorefine.cli import main
from autorefine.inference import BLOCK_STYLES, render_segments
from autorefine.rollout.trajectory import Segment
from tests.helpers import SYNTHETIC_DIR

SEGMENTS = [
    Segment("model", "<think> who is she </think>\n<search> Bigu Bolvou home city </search>", 0, 20),
    Segment(
        "documents",
        "\n\n<documents>\nDoc 1(Title: Bigu Bolvou) The home city is Stothby.\n</documents>\n\n",
        20,
        40,
    ),
    Segment("model", "<refine> home city: Stothby </refine>\n<answer> Stothby </answer>", 40, 60),
    Segment("model", "rambling without tags", 60, 64),
    Segment("feedback", "\n\n<documents>\nNo search was run.\n</documents>\n\n", 64, 70),
    Segment("eos", "<|endoftext|>", 70, 71),
]
QUESTION = "What is the home city of Bigu Bolvou?"
WARMSTART_ARGS = [
    "--model", str(SYNTHETIC_DIR / "warmstart"), "--template", str(SYNTHETIC_DIR / "template.txt"),
    "--max-turns", "2", "--max-new-tokens", "48", "--max-obs-tokens", "160",
    "--max-completion-tokens", "320", "--topk", "3",
]  # fmt: skip


def test_each_kind_of_block_is_labelled_and_coloured_differently():
    renderables = render_segments(SEGMENTS)
    lines = [r for r in renderables if isinstance(r, Text)]
    panels = [r for r in renderables if isinstance(r, Panel)]
    assert [t.plain.split("│")[0].strip() for t in lines] == ["think", "search", "refine", "answer", "text"]
    assert lines[1].plain.endswith("Bigu Bolvou home city") and lines[3].plain.endswith("Stothby")
    # Each block's body carries its own style, and the five kinds use five different styles.
    body_styles = [t.spans[-1].style for t in lines[:4]]
    assert body_styles == [BLOCK_STYLES[k] for k in ("think", "search", "refine", "answer")]
    assert len(set(BLOCK_STYLES.values())) == len(BLOCK_STYLES) == 5
    assert [p.title for p in panels] == ["documents", "feedback: no usable action"]
    assert panels[0].renderable == "Doc 1(Title: Bigu Bolvou) The home city is Stothby."  # tags dropped

    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    for r in renderables:
        console.print(r)
    text = console.export_text()
    assert text.index("think") < text.index("documents") < text.index("refine") < text.index("feedback")
    assert "<|endoftext|>" not in text  # EOS is no part of what the model said


def test_infer_greedy_prints_the_trajectory_and_the_answer(synthetic_bm25_server, capsys):
    assert main(["infer", *WARMSTART_ARGS, "--retriever-url", synthetic_bm25_server, QUESTION]) == 0
    out = capsys.readouterr().out
    for label in ("question", "think", "search", "documents", "refine", "answer", "finish: answer"):
        assert label in out
    assert "Doc 1(Title:" in out  # the real retriever's passages are shown
    assert "votes" not in out


def test_infer_esc_shows_votes_and_when_it_stopped(synthetic_bm25_server, capsys):
    args = ["infer", *WARMSTART_ARGS, "--retriever-url", synthetic_bm25_server, "--decoding", "esc"]
    assert main([*args, "--window", "2", "--max-samples", "6", "--seed", "0", QUESTION]) == 0
    out = capsys.readouterr().out
    assert "votes" in out and "window 1:" in out
    assert "stopped at window" in out or "no window agreed: majority over 6 of 6 samples" in out
    assert "trajectory of the winning answer" in out


def test_infer_refuses_a_bad_esc_budget(capsys):
    args = ["infer", "--model", "m", "--retriever-url", "http://127.0.0.1:9", "--decoding", "esc"]
    assert main([*args, "--window", "5", "--max-samples", "3", "q?"]) == 2
    assert "error: max_samples must be >= window (5)" in capsys.readouterr().err

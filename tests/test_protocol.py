"""The protocol parser, documents handling and prompt building, table-driven with hand-written expectations."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from autorefine.protocol import (
    CORRECTION_MESSAGE,
    DOCUMENTS_CLOSE,
    DOCUMENTS_OPEN,
    Action,
    Document,
    PromptTemplate,
    block_sequence,
    block_spans,
    build_prompt,
    final_answer,
    find_blocks,
    format_documents,
    normalize_question,
    parse_action,
    split_title,
    strip_documents,
)
from tests.helpers import QWEN_TOKENIZER

TOKENIZER_DIR = QWEN_TOKENIZER

S, A = "search", "answer"

# (id, one model turn, expected action as (kind, content) or None)
PARSE_CASES = [
    # plain actions
    (
        "plain-search",
        "<think>need facts</think><search> capital of France </search>",
        (S, "capital of France"),
    ),
    ("plain-answer", "<answer>Paris</answer>", (A, "Paris")),
    (
        "text-before-action",
        "Let me look it up. <search>Eiffel Tower height</search>",
        (S, "Eiffel Tower height"),
    ),
    ("inner-whitespace-collapsed", "<search>  capital \n of\tFrance  </search>", (S, "capital of France")),
    ("multiline-answer", "<answer>\nParis\n</answer>", (A, "Paris")),
    # letter case and blanks inside the brackets
    ("upper-case-tags", "<SEARCH>q</SEARCH>", (S, "q")),
    ("mixed-case-tags", "<Answer>Paris</aNSWER>", (A, "Paris")),
    ("blanks-in-open-and-close", "< search >q</ search >", (S, "q")),
    ("blanks-around-slash", "<answer>Paris< / answer >", (A, "Paris")),
    ("tag-prefix-is-not-a-tag", "<searching>q</searching><search_query>x</search_query>", None),
    # incomplete or empty blocks
    ("no-tags", "Paris", None),
    ("empty-turn", "", None),
    ("unclosed-search", "<search> who wrote Hamlet", None),
    ("unclosed-answer-after-think", "<think>t</think><answer> Paris", None),
    ("empty-search", "<search></search>", None),
    ("whitespace-only-answer", "<answer> \n\t </answer>", None),
    ("think-and-refine-only", "<think>a</think><refine>b</refine>", None),
    ("mismatched-pair", "<search> q </answer>", None),
    ("mismatched-then-valid", "<search> q </answer> <answer> x </answer>", (A, "x")),
    # nested / duplicated opening tags: innermost complete block
    ("nested-search-innermost", "<search> a <search> b </search>", (S, "b")),
    ("duplicated-answer-open", "<answer><answer>Paris</answer>", (A, "Paris")),
    ("nested-with-empty-innermost", "<search> a <search> </search> b </search>", None),
    # several actions: the block that closes first wins
    ("search-then-answer", "<search>q</search><answer>a</answer>", (S, "q")),
    ("answer-then-search", "<answer>a</answer><search>q</search>", (A, "a")),
    ("answer-inside-search-closes-first", "<search> q <answer> a </answer> </search>", (A, "a")),
    ("search-inside-answer-closes-first", "<answer> x <search> y </search> z </answer>", (S, "y")),
    ("two-searches-first-wins", "<search>one</search><search>two</search>", (S, "one")),
    ("empty-then-valid-same-kind", "<search> </search><search>q</search>", (S, "q")),
    ("empty-search-then-answer", "<search></search> <answer>Paris</answer>", (A, "Paris")),
    ("empty-answer-then-search", "<answer> </answer><search>q</search>", (S, "q")),
    # unicode content
    ("unicode-answer", "<answer> Café  Müller — 東京 </answer>", (A, "Café Müller — 東京")),
    ("unicode-query", "<search>Ελλάδα\u00a0πρωτεύουσα</search>", (S, "Ελλάδα πρωτεύουσα")),
    # adversarial documents
    ("docs-contain-answer", "<documents>Doc 1(Title: X) <answer>X</answer></documents>", None),
    ("docs-contain-search", "<documents>Doc 1(Title: Y) <search>y</search></documents>", None),
    (
        "docs-contain-refine-and-answer-then-real-search",
        "<documents><refine>r</refine><answer>X</answer></documents><search>real query</search>",
        (S, "real query"),
    ),
    ("unclosed-docs-swallow-later-answer", "<documents> Doc 1(Title: Z) z text <answer>X</answer>", None),
    ("real-action-before-unclosed-docs", "<search>q</search><documents> <answer>X</answer>", (S, "q")),
    ("docs-before-real-answer", "<documents><answer>X</answer></documents><answer>Y</answer>", (A, "Y")),
    ("docs-after-real-answer", "<answer>Y</answer><documents><search>Z</search></documents>", (A, "Y")),
    (
        "docs-tags-case-and-blanks",
        "< DOCUMENTS ><answer>X</answer></ documents ><answer>Y</answer>",
        (A, "Y"),
    ),
    (
        "environment-wrapper-constants",
        f"{DOCUMENTS_OPEN}<answer>X</answer>{DOCUMENTS_CLOSE}<search>q</search>",
        (S, "q"),
    ),
    ("correction-message-is-no-action", CORRECTION_MESSAGE, None),
    (
        "answer-mentions-documents-word",
        "<answer>the documents say Paris</answer>",
        (A, "the documents say Paris"),
    ),
    ("answer-mentions-closing-tag", "<answer>a </documents> b</answer>", (A, "a </documents> b")),
    # An opening <documents> inside an answer starts an unclosed documents span: it swallows the closing tag.
    ("answer-mentions-opening-tag", "<answer>wrap in <documents> tags</answer>", None),
    ("answer-mentions-closed-docs-pair", "<answer>Par<documents>junk</documents>is</answer>", (A, "Par is")),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in PARSE_CASES])
def test_parse_action(text: str, expected: tuple[str, str] | None) -> None:
    action = parse_action(text)
    if expected is None:
        assert action is None
    else:
        assert action == Action(*expected)


def test_parse_table_is_large_and_ids_unique() -> None:
    ids = [i for i, _, _ in PARSE_CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


# (id, model text, expected final answer)
FINAL_ANSWER_CASES = [
    ("none", "<think>t</think><search>q</search>", None),
    ("single", "<answer>Paris</answer>", "Paris"),
    ("stripped-not-collapsed", "<answer>  New  York \n</answer>", "New  York"),
    ("last-wins", "<answer>London</answer> then <answer>Paris</answer>", "Paris"),
    ("documents-excluded", "<answer>London</answer><documents><answer>Paris</answer></documents>", "London"),
    ("only-in-documents", "<documents><answer>Paris</answer></documents>", None),
    ("unclosed-docs-swallow", "<answer>London</answer><documents> <answer>Paris</answer>", "London"),
    ("unclosed-last-ignored", "<answer>London</answer><answer>Paris", "London"),
    ("empty-is-no-answer", "<answer></answer>", None),
    ("whitespace-is-no-answer", "<answer> \n </answer>", None),
    ("empty-last-skipped", "<answer>Paris</answer><answer> </answer>", "Paris"),
    ("case-insensitive", "<ANSWER> Paris </Answer>", "Paris"),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in FINAL_ANSWER_CASES])
def test_final_answer(text: str, expected: str | None) -> None:
    assert final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "tag", "expected"),
    [
        pytest.param(
            "<refine>a</refine><documents><refine>x</refine></documents><refine> b </refine>",
            "refine",
            ["a", "b"],
            id="refine-outside-documents-in-order",
        ),
        pytest.param("<refine></refine><refine>r</refine>", "refine", ["", "r"], id="empty-blocks-kept"),
        pytest.param("<THINK> t1 </think> x <think>t2</think>", "think", ["t1", "t2"], id="think-case"),
        pytest.param("<refine>a<documents>b", "refine", [], id="unclosed-docs-eat-close"),
        pytest.param("<search>q</search>", "answer", [], id="other-tag"),
        pytest.param("<answer> a\n b </answer>", "answer", ["a\n b"], id="stripped-only"),
    ],
)
def test_find_blocks(text: str, tag: str, expected: list[str]) -> None:
    assert find_blocks(text, tag) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("a<documents>x</documents>b", "a b", id="closed"),
        pytest.param("a<documents>x <answer>y</answer>", "a ", id="unclosed-to-end"),
        pytest.param("a<documents>x</documents>b<documents>y</documents>c", "a b c", id="two-blocks"),
        pytest.param("<Documents >x</ DOCUMENTS>b", " b", id="case-and-blanks"),
        pytest.param("no documents here", "no documents here", id="unchanged"),
        pytest.param("a</documents>b", "a</documents>b", id="stray-close-kept"),
        pytest.param("<documents>\nline1\nline2\n</documents>", " ", id="multiline"),
    ],
)
def test_strip_documents(text: str, expected: str) -> None:
    assert strip_documents(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "<think>t</think><search>q</search><documents><refine>x</refine></documents><refine>r</refine>"
            "<answer>a</answer>",
            ["think", "search", "refine", "answer"],
            id="documents-excluded",
        ),
        pytest.param("<answer>a</answer><think>t</think>", ["answer", "think"], id="order-of-appearance"),
        pytest.param("<think>t", [], id="incomplete"),
    ],
)
def test_block_sequence(text: str, expected: list[str]) -> None:
    assert block_sequence(text) == expected


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        pytest.param('"Paris"\nParis is the capital.', ("Paris", "Paris is the capital."), id="quoted"),
        pytest.param("Paris\nParis is the capital.", ("Paris", "Paris is the capital."), id="bare"),
        pytest.param('"The "Best" Song"\nA song.', ('The "Best" Song', "A song."), id="inner-quotes"),
        pytest.param('"Half quoted\ntext', ('"Half quoted', "text"), id="one-quote-kept"),
        pytest.param('  "Padded"  \n  text  ', ("Padded", "text"), id="padding-stripped"),
        pytest.param('""\ntext', ("", "text"), id="empty-quoted-title"),
        pytest.param('"', ('"', ""), id="lone-quote"),
        # No newline: the whole contents is the title line (as the FlashRAG-based reference code reads it).
        pytest.param("No newline at all", ("No newline at all", ""), id="no-newline"),
        pytest.param('"Münster"\nStadt in Westfalen', ("Münster", "Stadt in Westfalen"), id="unicode"),
    ],
)
def test_split_title(contents: str, expected: tuple[str, str]) -> None:
    assert split_title(contents) == expected


def test_format_documents() -> None:
    docs = [
        Document(id="7", contents='"Paris"\nParis is the capital of France.', score=0.9),
        Document(id="8", contents="Lyon\nLyon is a city."),
    ]
    assert format_documents(docs) == (
        "Doc 1(Title: Paris) Paris is the capital of France.\nDoc 2(Title: Lyon) Lyon is a city."
    )
    assert format_documents([]) == ""


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        pytest.param("who wrote Hamlet", "who wrote Hamlet?", id="adds-mark"),
        pytest.param("  who wrote Hamlet?  \n", "who wrote Hamlet?", id="strips-keeps-one"),
        pytest.param("who wrote Hamlet \t", "who wrote Hamlet?", id="strip-then-add"),
        pytest.param("really??", "really??", id="no-extra-mark"),
        pytest.param("¿Dónde está Bogotá", "¿Dónde está Bogotá?", id="unicode"),
    ],
)
def test_normalize_question(question: str, expected: str) -> None:
    assert normalize_question(question) == expected


# ---- PromptTemplate ---------------------------------------------------------------------------------------


def test_template_renders_question_and_topk() -> None:
    template = PromptTemplate("Top {topk} passages. Question: {question}")
    assert template.render("  who is it ", 3) == "Top 3 passages. Question: who is it?"


def test_template_literal_braces_allowed() -> None:
    assert PromptTemplate("{{json}} {question}").render("q", 1) == "{json} q?"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Answer this question.", id="no-placeholder"),
        pytest.param("Answer {topk} times.", id="topk-only"),
        pytest.param("Answer: {{question}}", id="escaped-question-is-literal"),
    ],
)
def test_template_without_question_rejected_naming_file(text: str, tmp_path: Path) -> None:
    path = tmp_path / "my_prompt.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"my_prompt\.txt.*\{question\}"):
        PromptTemplate.load(path)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{question} {", id="lone-open"),
        pytest.param("{question} }", id="lone-close"),
        pytest.param("{question} {context}", id="unknown-name"),
        pytest.param("{question} {}", id="positional"),
        pytest.param("{question} {0}", id="numbered"),
        pytest.param("{question.upper}", id="attribute"),
        pytest.param("{question} {topk[0]}", id="index"),
        pytest.param("{question:d}", id="bad-format-spec"),
    ],
)
def test_template_stray_braces_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"<inline> may use only \{question\} and \{topk\}"):
        PromptTemplate(text)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("Q: {question!r}", "no conversion or format spec", id="conversion"),
        pytest.param("Q: {question:>30}", "no conversion or format spec", id="format-spec"),
        pytest.param("Q: \ue000 {question}", "U\\+E000", id="question-slot-character"),
    ],
)
def test_template_must_set_the_question_in_as_written(text: str, match: str) -> None:
    # The prompt's ids tell the question from the template by where it was set in (`prompt_ids`).
    with pytest.raises(ValueError, match=match):
        PromptTemplate(text)


def test_template_load_default() -> None:
    template = PromptTemplate.load()
    assert template.source == "autorefine/templates/autorefine.txt"
    assert "{question}" in template.text and "{topk}" in template.text
    rendered = template.render("who wrote Hamlet", 3)
    assert "who wrote Hamlet?" in rendered
    assert "{question}" not in rendered and "{topk}" not in rendered
    for tag in ("<think>", "<search>", "<documents>", "<refine>", "<answer>"):
        assert tag in rendered


def test_template_load_user_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("Frage: {question} (k={topk})", encoding="utf-8")
    template = PromptTemplate.load(str(path))
    assert template.source == str(path)
    assert template.render("Wer ist das", 5) == "Frage: Wer ist das? (k=5)"


def test_template_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        PromptTemplate.load(missing)


# ---- build_prompt with the real Qwen2.5 tokenizer ---------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from autorefine.modeling import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


def test_build_prompt_uses_chat_template(qwen_tokenizer) -> None:
    template = PromptTemplate("Q: {question} k={topk}")
    prompt = build_prompt("  who wrote Hamlet ", qwen_tokenizer, template, 3)
    assert prompt.startswith("<|im_start|>")
    assert prompt.endswith("<|im_start|>user\nQ: who wrote Hamlet? k=3<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>user") == 1


def test_build_prompt_plain_without_chat_template(qwen_tokenizer) -> None:
    plain = copy.deepcopy(qwen_tokenizer)
    plain.chat_template = None
    template = PromptTemplate("Q: {question} k={topk}")
    assert build_prompt("who wrote Hamlet", plain, template, 2) == "Q: who wrote Hamlet? k=2"
    assert qwen_tokenizer.chat_template  # the copy did not change the shared tokenizer


def test_a_chat_template_that_rewrites_the_user_text_is_refused(qwen_tokenizer) -> None:
    cut = copy.deepcopy(qwen_tokenizer)
    cut.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'][:2] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="does not keep the user's text as written"):
        build_prompt("who wrote Hamlet", cut, PromptTemplate("Q: {question}"), 3)


def test_block_spans_index_the_original_text_and_skip_documents():
    text = "<think> a </think>\n<documents> <answer> no </answer> </documents><search> q </search> <refine> r"
    spans = block_spans(text)
    assert [(tag, text[start:end]) for tag, start, end in spans] == [
        ("think", "<think> a </think>"),
        ("search", "<search> q </search>"),
    ]

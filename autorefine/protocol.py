"""The search-augmented reasoning protocol: the one place that defines prompt, tags, parsing and documents.

Training, evaluation and inference all build prompts, environment text and parsed actions through this
module; nothing else in the project spells a tag or a template.

A trajectory reads

    <think> … </think> <search> query </search>
    <documents> Doc 1(Title: …) … </documents>          (inserted by the environment)
    <refine> … </refine> … <answer> final answer </answer>
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINK, SEARCH, DOCUMENTS, REFINE, ANSWER = "think", "search", "documents", "refine", "answer"
TAGS = (THINK, SEARCH, DOCUMENTS, REFINE, ANSWER)

# Generation of one model turn stops right after one of these; EOS stops it too.
STOP_STRINGS = (f"</{SEARCH}>", f"</{ANSWER}>")

DOCUMENTS_OPEN = f"\n\n<{DOCUMENTS}>\n"
DOCUMENTS_CLOSE = f"\n</{DOCUMENTS}>\n\n"

# Inserted after a turn that ends without a usable action, so the model can recover.
CORRECTION_MESSAGE = (
    f"\n\n<{DOCUMENTS}>\nNo search was run. To search, write <{SEARCH}> query </{SEARCH}>; "
    f"to finish, write <{ANSWER}> final answer </{ANSWER}>.\n</{DOCUMENTS}>\n\n"
)

DEFAULT_TEMPLATE_NAME = "autorefine.txt"
# Answers from the model alone (the no-retrieval baseline): think, then answer; no search instructions.
NO_RETRIEVAL_TEMPLATE_NAME = "no_retrieval.txt"


def _tag_pattern(tag: str) -> re.Pattern[str]:
    # Tolerates letter case and blanks inside the brackets; the body may not contain another opening tag,
    # so `<search> a <search> b </search>` yields the innermost, complete block "b".
    open_, close = rf"<\s*{tag}\s*>", rf"<\s*/\s*{tag}\s*>"
    return re.compile(rf"{open_}((?:(?!{open_}).)*?){close}", re.IGNORECASE | re.DOTALL)


_BLOCK = {tag: _tag_pattern(tag) for tag in TAGS}
# A <documents> block, or an unclosed one running to the end of the text.
_DOCUMENTS_SPAN = re.compile(
    rf"<\s*{DOCUMENTS}\s*>.*?(?:<\s*/\s*{DOCUMENTS}\s*>|\Z)", re.IGNORECASE | re.DOTALL
)


# Stands where the question goes while the chat template is rendered: a private-use character, which no
# template writes, so the template's own text and special tokens can be told from the question's.
_QUESTION_SLOT = "\ue000"


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction template with a `{question}` and an optional `{topk}` placeholder."""

    text: str
    source: str = "<inline>"

    def __post_init__(self) -> None:
        # Parse the placeholders rather than search the text: `{{question}}` is a literal, not a placeholder.
        rule = f"prompt template {self.source} may use only {{question}} and {{topk}} (write literal braces as {{{{ }}}})"
        try:
            parsed = [
                (name, spec, conv)
                for _, name, spec, conv in string.Formatter().parse(self.text)
                if name is not None
            ]
        except ValueError as err:
            raise ValueError(f"{rule}: {err}") from err
        fields = {name for name, _, _ in parsed}
        if unknown := fields - {"question", "topk"}:
            raise ValueError(f"{rule}: {sorted(unknown)}")
        if "question" not in fields:
            raise ValueError(f"prompt template {self.source} has no {{question}} placeholder")
        try:
            self.text.format(question="", topk=0)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{rule}: {err}") from err
        # The question is set in as written, so the prompt can tell its text from the template's (`prompt_ids`).
        if any(name == "question" and (spec or conv) for name, spec, conv in parsed):
            raise ValueError(
                f"prompt template {self.source}: {{question}} takes no conversion or format spec"
            )
        if _QUESTION_SLOT in self.text:
            raise ValueError(f"prompt template {self.source} contains U+E000, which stands for the question")

    @classmethod
    def packaged(cls, name: str = DEFAULT_TEMPLATE_NAME) -> PromptTemplate:
        """A template shipped in `autorefine/templates`."""
        text = resources.files("autorefine.templates").joinpath(name).read_text("utf-8")
        return cls(text, source=f"autorefine/templates/{name}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> PromptTemplate:
        """Load a user template file, or the packaged default when `path` is None."""
        if path is None:
            return cls.packaged()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt template file not found: {path}")
        return cls(path.read_text(encoding="utf-8"), source=str(path))

    def render(self, question: str, topk: int) -> str:
        """The instruction text for one question."""
        return self.text.format(question=normalize_question(question), topk=topk)


def normalize_question(question: str) -> str:
    """Strip the question and end it with a question mark."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def build_prompt(
    question: str, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, topk: int
) -> str:
    """The full prompt text: the instruction as one user turn of the chat template, or plain text without one.

    With a chat template the prompt ends inside an opened assistant turn, which the model continues; the
    environment's documents are later inserted into that same turn.
    """
    return normalize_question(question).join(_prompt_parts(tokenizer, template, topk))


def _prompt_parts(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, topk: int) -> list[str]:
    """The prompt text around each place the question goes: the template rendered with a slot for it."""
    instruction = template.text.format(question=_QUESTION_SLOT, topk=topk)
    prompt = _chat_prompt(instruction, tokenizer)
    parts = prompt.split(_QUESTION_SLOT)
    if len(parts) != instruction.count(_QUESTION_SLOT) + 1:
        # Rendering with a slot is how the question is kept apart from the template's special tokens.
        raise ValueError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} does not keep the "
            "user's text as written (it changes or writes U+E000)"
        )
    return parts


def _chat_prompt(instruction: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """`instruction` as one user turn and an opened assistant turn of the chat template; itself without one."""
    if not getattr(tokenizer, "chat_template", None):
        return instruction
    messages = [{"role": "user", "content": instruction}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False):
        # The model would continue the user's turn, writing the question's continuation, not an answer.
        raise ValueError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} opens no assistant "
            "turn (add_generation_prompt changes nothing); fix the template or remove it to use plain prompts"
        )
    return prompt


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of text the model did not write (documents, questions, messages): special tokens' spellings
    in it stay plain text."""
    # A web passage or a question holding `<|im_end|>` or `<|im_start|>system` would otherwise end the turn
    # or open a role as the very control tokens the model was tuned on.
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def prompt_ids(
    question: str, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, topk: int
) -> list[int]:
    """Token ids of `build_prompt`: the template's special tokens are control tokens, the question is text."""
    parts = _prompt_parts(tokenizer, template, topk)
    text = normalize_question(question)
    prompt = text.join(parts)
    specials = _special_tokens(tokenizer)
    if specials is None or _matches(specials, prompt) == _template_matches(specials, parts, len(text)):
        # The question spells no special token: the prompt as the tokenizer itself encodes it.
        return tokenizer.encode(prompt, add_special_tokens=False)
    return _encode_around(tokenizer, specials, parts, text)


def _encode_around(
    tokenizer: PreTrainedTokenizerBase, specials: re.Pattern[str], parts: list[str], text: str
) -> list[int]:
    """The template parts with `text` between them, split at the parts' own special tokens only: those stay
    control tokens, everything else (the text above all) is encoded as plain text."""
    ids: list[int] = []
    plain = ""
    for i, part in enumerate(parts):
        plain += text if i else ""
        for j, piece in enumerate(specials.split(part)):
            if j % 2 == 0:  # the split keeps each special token as the odd piece
                plain += piece
                continue
            ids += [*encode_text(tokenizer, plain), tokenizer.convert_tokens_to_ids(piece)]
            plain = ""
    return ids + encode_text(tokenizer, plain)


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str] | None:
    """A pattern of the tokenizer's special tokens (longest first, as its own matching), or None if it has none."""
    tokens = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def _matches(pattern: re.Pattern[str], text: str) -> list[tuple[int, str]]:
    """(offset, token) of each special token spelled in `text`."""
    return [(m.start(), m.group()) for m in pattern.finditer(text)]


def _template_matches(pattern: re.Pattern[str], parts: list[str], slot_length: int) -> list[tuple[int, str]]:
    """Special tokens of the template parts, at their offsets in the prompt once the question fills each slot."""
    found, offset = [], 0
    for part in parts:
        found += [(offset + start, token) for start, token in _matches(pattern, part)]
        offset += len(part) + slot_length
    return found


@dataclass(frozen=True)
class Document:
    """One retrieved passage: FlashRAG `contents` is the title on the first line, then the text."""

    id: str
    contents: str
    score: float | None = None


def split_title(contents: str) -> tuple[str, str]:
    """Split FlashRAG `contents` into (title, text): the title is the first line, quoted or not."""
    title, _, text = contents.partition("\n")
    title = title.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, text.strip()


def format_documents(documents: list[Document]) -> str:
    """One line per passage: `Doc i(Title: t) text` (whitespace inside a passage collapsed to single spaces)."""
    lines = []
    for i, doc in enumerate(documents, start=1):
        title, text = split_title(doc.contents)
        lines.append(f"Doc {i}(Title: {title}) {' '.join(text.split())}")
    return "\n".join(lines)


_DOC_LINE = re.compile(r"^Doc \d+\(Title: (?P<title>.*?)\) (?P<text>.*)$")


def parse_documents(text: str) -> list[tuple[str, str]]:
    """(title, text) of each passage line `format_documents` wrote into `text` (wrapper tags are skipped)."""
    found = []
    for line in text.splitlines():
        match = _DOC_LINE.match(line.lstrip())
        if match:
            found.append((match["title"], match["text"].strip()))
    return found


def strip_documents(text: str) -> str:
    """Remove every `<documents>` block (closed or running to the end) so nothing inside is parsed."""
    return _DOCUMENTS_SPAN.sub(" ", text)


def find_blocks(text: str, tag: str) -> list[str]:
    """Stripped bodies of every complete `<tag>…</tag>` block outside documents, in order."""
    return [m.group(1).strip() for m in _BLOCK[tag].finditer(strip_documents(text))]


# Any complete block, for display: the same tolerance as `_tag_pattern`, the closing tag matching the opening.
_ANY_BLOCK = re.compile(
    rf"<\s*({'|'.join(TAGS)})\s*>((?:(?!<\s*\1\s*>).)*?)<\s*/\s*\1\s*>", re.IGNORECASE | re.DOTALL
)


def split_blocks(text: str) -> list[tuple[str | None, str]]:
    """`text` cut into complete tagged blocks `(tag, body)` and the plain text around them `(None, text)`."""
    pieces: list[tuple[str | None, str]] = []
    cursor = 0
    for match in _ANY_BLOCK.finditer(text):
        if match.start() > cursor:
            pieces.append((None, text[cursor : match.start()]))
        pieces.append((match.group(1).lower(), match.group(2).strip()))
        cursor = match.end()
    if cursor < len(text):
        pieces.append((None, text[cursor:]))
    return pieces


ActionKind = Literal["search", "answer"]


@dataclass(frozen=True)
class Action:
    """What one model turn asked for: a search query or a final answer."""

    kind: ActionKind
    content: str


def parse_action(turn_text: str) -> Action | None:
    """The first complete, non-empty `<search>` or `<answer>` block of one model turn; None when there is none."""
    text = strip_documents(turn_text)
    found: list[tuple[int, Action]] = []
    for kind in (SEARCH, ANSWER):
        for match in _BLOCK[kind].finditer(text):
            content = " ".join(match.group(1).split())
            if content:
                found.append((match.end(), Action(kind, content)))
                break
    if not found:
        return None
    return min(found, key=lambda item: item[0])[1]


def block_sequence(text: str) -> list[str]:
    """Tags of the complete think/search/refine/answer blocks outside documents, in order of appearance."""
    text = strip_documents(text)
    found = [(m.start(), tag) for tag in (THINK, SEARCH, REFINE, ANSWER) for m in _BLOCK[tag].finditer(text)]
    return [tag for _, tag in sorted(found)]


def block_spans(text: str) -> list[tuple[str, int, int]]:
    """`(tag, start, end)` character spans of the complete think/search/refine/answer blocks outside documents,
    tags included, in order of appearance."""
    # Blank documents out with spaces of the same length, so offsets still index `text`.
    blanked = _DOCUMENTS_SPAN.sub(lambda m: " " * len(m.group(0)), text)
    found = [
        (m.start(), m.end(), tag)
        for tag in (THINK, SEARCH, REFINE, ANSWER)
        for m in _BLOCK[tag].finditer(blanked)
    ]
    return [(tag, start, end) for start, end, tag in sorted(found)]


def final_answer(model_text: str) -> str | None:
    """The last non-empty `<answer>` block of a model's own text (documents excluded), or None."""
    # An empty block is no answer, as it is no action for `parse_action`.
    answers = [a for a in find_blocks(model_text, ANSWER) if a]
    return answers[-1] if answers else None

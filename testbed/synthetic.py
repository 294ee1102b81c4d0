"""A synthetic retrieval-only QA task: made-up people whose home city is stated in exactly one passage.

No model can know these facts in advance, so a rising held-out score can only come from searching and
reading: held-out people never appear in training questions (their passages are in the corpus, as in
open-domain QA). Each person also has a distractor passage with the same name and no city, and first
names are shared across people, so retrieval returns look-alike passages the policy must read past.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from autorefine import protocol
from autorefine.data import Question
from autorefine.protocol import Document
from autorefine.training.sft.traces import answer_turn, search_turn

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kl",
    "tr",
    "st",
    "gr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]
_CITY_SUFFIXES = ["moor", "ford", "holm", "wick", "dale", "stead", "port", "mere", "by", "gate"]
_OCCUPATIONS = [
    "baker",
    "pilot",
    "weaver",
    "mason",
    "painter",
    "farmer",
    "sailor",
    "tailor",
    "miner",
    "potter",
]
_HOBBIES = ["chess", "rowing", "archery", "gardening", "singing", "fishing", "hiking", "knitting"]

QUESTION = "What is the home city of {name}?"
TEMPLATE = "Search, then answer.\nQuestion: {question}\n"


@dataclass(frozen=True)
class Person:
    """One made-up entity and its attribute."""

    name: str
    city: str
    occupation: str
    born: int
    hobby: str


def made_up_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable lowercase word no model has seen as a name."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def made_up_cities(num_cities: int, rng: random.Random) -> list[str]:
    """Distinct city names such as "Bramoor"."""
    cities = sorted(
        {made_up_word(rng, 1).capitalize() + rng.choice(_CITY_SUFFIXES) for _ in range(num_cities * 3)}
    )
    return rng.sample(cities, num_cities)


def made_up_names(count: int, num_first_names: int, rng: random.Random) -> list[str]:
    """Distinct "First Last" names, sorted; first names are shared, so a first name alone never identifies one."""
    first_names = [made_up_word(rng, 2).capitalize() for _ in range(num_first_names)]
    names: set[str] = set()
    while len(names) < count:
        names.add(f"{rng.choice(first_names)} {made_up_word(rng, 2).capitalize()}")
    return sorted(names)


def make_people(num_people: int, num_cities: int, num_first_names: int, rng: random.Random) -> list[Person]:
    """Unique people; first names and cities are shared so names alone never identify a passage."""
    cities = made_up_cities(num_cities, rng)
    names = made_up_names(num_people, num_first_names, rng)
    return [
        Person(
            name, rng.choice(cities), rng.choice(_OCCUPATIONS), rng.randint(1900, 1999), rng.choice(_HOBBIES)
        )
        for name in names
    ]


def passages(person: Person) -> list[str]:
    """The FlashRAG `contents` of a person's two passages: the fact, and a distractor without it."""
    return [
        f'"{person.name}"\n{person.name} is a {person.occupation}. The home city of {person.name} is {person.city}.',
        f'"{person.name}"\n{person.name} was born in {person.born} and likes {person.hobby}.',
    ]


def write_task(
    out: Path,
    *,
    num_people: int = 3000,
    heldout_fraction: float = 0.1,
    num_cities: int = 60,
    num_first_names: int = 40,
    seed: int = 0,
) -> dict[str, int]:
    """Write corpus.jsonl, train.jsonl, heldout.jsonl, template.txt and people.jsonl into `out`."""
    rng = random.Random(seed)
    people = make_people(num_people, num_cities, num_first_names, rng)
    order = list(range(len(people)))
    rng.shuffle(order)
    num_heldout = round(len(people) * heldout_fraction)
    heldout = {people[i].name for i in order[:num_heldout]}

    out.mkdir(parents=True, exist_ok=True)
    corpus = [text for person in people for text in passages(person)]
    rng.shuffle(corpus)
    _write_jsonl(out / "corpus.jsonl", [{"id": str(i), "contents": text} for i, text in enumerate(corpus)])
    rows = {"train": [], "heldout": []}
    for i, person in enumerate(people):
        split = "heldout" if person.name in heldout else "train"
        rows[split].append(
            {
                "id": f"synthetic-{i}",
                "question": QUESTION.format(name=person.name),
                "golden_answers": [person.city],
            }
        )
    _write_jsonl(out / "train.jsonl", rows["train"])
    _write_jsonl(out / "heldout.jsonl", rows["heldout"])
    _write_jsonl(out / "people.jsonl", [person.__dict__ for person in people])
    (out / "template.txt").write_text(TEMPLATE, encoding="utf-8")
    return {
        "people": len(people),
        "passages": len(corpus),
        "train": len(rows["train"]),
        "heldout": num_heldout,
    }


def load_people(path: Path) -> dict[str, Person]:
    """People by question text, from people.jsonl."""
    people = [Person(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {QUESTION.format(name=p.name): p for p in people}


def tokenizer_training_text(task_dir: Path) -> list[str]:
    """Texts a tokenizer for this task must encode compactly: passages, prompts and gold turns."""
    template = (task_dir / "template.txt").read_text(encoding="utf-8")
    texts = [
        json.loads(line)["contents"] for line in (task_dir / "corpus.jsonl").read_text("utf-8").splitlines()
    ]
    for question_text, person in load_people(task_dir / "people.jsonl").items():
        question = Question("", question_text, [person.city])
        documents = protocol.format_documents([Document("", text) for text in passages(person)])
        texts += [template.format(question=question_text, topk=3), search_turn(question)]
        texts.append(answer_turn(question, documents))
    texts += [protocol.DOCUMENTS_OPEN, protocol.DOCUMENTS_CLOSE, protocol.CORRECTION_MESSAGE]
    texts += [f"Doc {i}(Title: x) y" for i in range(1, 6)]
    return texts


def train_tokenizer(
    task_dir: Path, vocab_size: int = 1024, texts: list[str] | None = None
):  # -> PreTrainedTokenizerFast
    """A small byte-level BPE tokenizer for a task's `texts` (default: this task's); protocol tags are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or tokenizer_training_text(task_dir), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos)
    fast.add_tokens([f"<{tag}>" for tag in protocol.TAGS] + [f"</{tag}>" for tag in protocol.TAGS])
    return fast


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

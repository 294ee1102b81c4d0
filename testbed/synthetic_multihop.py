"""A multi-hop synthetic task: made-up people work for made-up companies, and companies have home cities.

Three kinds of question, each carrying its gold evidence (`metadata.evidence`), its hop count (`hops`) and its
kind (`kind`: employer, city, two_hop):

- "Which company does X work for?"                            one hop: X's passage
- "What is the home city of C?"                               one hop: C's passage
- "What is the home city of the company X works for?"         two hops: X's passage names C, C's names the city

A policy answers a one-hop question with one search and a two-hop question with two (X, then the company
it read about); more searches are possible and wasteful. Every entity has a distractor passage under the same
title, first names are shared, and a person's passage names the city they live in, which is never the answer
to a two-hop question: answering after the first hop is a plausible mistake. Held-out questions ask only
about held-out companies and their employees, none of whom appears in a training question.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autorefine.data import Evidence, Question
from autorefine.training.sft.traces import TracePlan
from testbed.synthetic import made_up_cities, made_up_names, made_up_word

if TYPE_CHECKING:
    from autorefine.scoring.trajectory import TrajectoryScores

EMPLOYER_QUESTION = "Which company does {person} work for?"
CITY_QUESTION = "What is the home city of {company}?"
TWO_HOP_QUESTION = "What is the home city of the company {person} works for?"
TEMPLATE = "Search, then answer.\nQuestion: {question}\n"

_COMPANY_SUFFIXES = ["Forge", "Mills", "Foundry", "Traders", "Group", "Labs", "Motors", "Textiles"]
_PRODUCTS = ["bricks", "ropes", "lamps", "boats", "clocks", "paper", "glass", "soap", "tools", "carpets"]


@dataclass(frozen=True)
class Company:
    """A made-up company and its home city."""

    name: str
    city: str
    product: str
    founded: int


@dataclass(frozen=True)
class Employee:
    """A made-up person, the company they work for, and the city they live in (never the company's)."""

    name: str
    company: str
    city: str
    born: int


@dataclass(frozen=True)
class World:
    """Every entity of the task."""

    companies: dict[str, Company]
    people: dict[str, Employee]


def make_world(
    num_people: int, num_companies: int, num_cities: int, num_first_names: int, rng: random.Random
) -> World:
    """Companies with distinct names and shared cities; people spread over the companies."""
    cities = made_up_cities(num_cities, rng)
    names: set[str] = set()
    while len(names) < num_companies:
        names.add(f"{made_up_word(rng, 2).capitalize()} {rng.choice(_COMPANY_SUFFIXES)}")
    companies = [
        Company(name, rng.choice(cities), rng.choice(_PRODUCTS), rng.randint(1800, 1999))
        for name in sorted(names)
    ]
    people = []
    for name in made_up_names(num_people, num_first_names, rng):
        company = rng.choice(companies)
        home = rng.choice([city for city in cities if city != company.city])
        people.append(Employee(name, company.name, home, rng.randint(1900, 1999)))
    return World({c.name: c for c in companies}, {p.name: p for p in people})


def company_passages(company: Company) -> list[str]:
    """FlashRAG `contents` of a company's passages: the fact, and a distractor without it."""
    return [
        f'"{company.name}"\n{city_evidence(company).text}',
        f'"{company.name}"\n{company.name} was founded in {company.founded} and makes {company.product}.',
    ]


def person_passages(person: Employee) -> list[str]:
    """FlashRAG `contents` of a person's passages: the fact (employer and own city), and a distractor."""
    return [
        f'"{person.name}"\n{home_evidence(person).text} {employer_evidence(person).text}',
        f'"{person.name}"\n{person.name} was born in {person.born}.',
    ]


def home_evidence(person: Employee) -> Evidence:
    """The fact naming the city a person lives in: never evidence for a question, only a tempting answer."""
    return Evidence(person.name, f"{person.name} lives in {person.city}.", person.city)


def employer_evidence(person: Employee) -> Evidence:
    """The fact naming a person's company (the bridge of a two-hop question)."""
    return Evidence(person.name, f"{person.name} works for {person.company}.", person.company)


def city_evidence(company: Company) -> Evidence:
    """The fact naming a company's home city."""
    return Evidence(company.name, f"The home city of {company.name} is {company.city}.", company.city)


KINDS = ("employer", "city", "two_hop")


def _row(qid: str, kind: str, question: str, answer: str, evidence: list[Evidence]) -> dict:
    metadata = {"hops": len(evidence), "kind": kind, "evidence": [item.to_dict() for item in evidence]}
    return {"id": qid, "question": question, "golden_answers": [answer], "metadata": metadata}


def person_question(qid: str, person: Employee, world: World, two_hop: bool) -> dict:
    """The employer question about `person`, or the two-hop question through their company."""
    if not two_hop:
        question = EMPLOYER_QUESTION.format(person=person.name)
        return _row(qid, "employer", question, person.company, [employer_evidence(person)])
    company = world.companies[person.company]
    evidence = [employer_evidence(person), city_evidence(company)]
    return _row(qid, "two_hop", TWO_HOP_QUESTION.format(person=person.name), company.city, evidence)


def company_question(qid: str, company: Company) -> dict:
    """The home-city question about `company`."""
    question = CITY_QUESTION.format(company=company.name)
    return _row(qid, "city", question, company.city, [city_evidence(company)])


def write_multihop_task(
    out: Path,
    *,
    num_people: int = 1500,
    num_companies: int = 300,
    heldout_fraction: float = 0.1,
    two_hop_fraction: float = 0.6,
    num_cities: int = 40,
    num_first_names: int = 40,
    seed: int = 0,
) -> dict[str, int]:
    """Write corpus.jsonl, train.jsonl, heldout.jsonl, entities.jsonl and template.txt into `out`.

    Every person gets one question (two-hop with probability `two_hop_fraction`, else the employer question)
    and every company one home-city question; held-out companies and their employees go to heldout.jsonl.
    """
    rng = random.Random(seed)
    world = make_world(num_people, num_companies, num_cities, num_first_names, rng)
    names = sorted(world.companies)
    rng.shuffle(names)
    heldout = set(names[: round(len(names) * heldout_fraction)])

    out.mkdir(parents=True, exist_ok=True)
    corpus = [text for c in world.companies.values() for text in company_passages(c)]
    corpus += [text for p in world.people.values() for text in person_passages(p)]
    rng.shuffle(corpus)
    _write_jsonl(out / "corpus.jsonl", [{"id": str(i), "contents": text} for i, text in enumerate(corpus)])
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    for i, person in enumerate(world.people.values()):
        split = "heldout" if person.company in heldout else "train"
        rows[split].append(person_question(f"multihop-p{i}", person, world, rng.random() < two_hop_fraction))
    for i, company in enumerate(world.companies.values()):
        split = "heldout" if company.name in heldout else "train"
        rows[split].append(company_question(f"multihop-c{i}", company))
    for split in rows:
        rng.shuffle(rows[split])
        _write_jsonl(out / f"{split}.jsonl", rows[split])
    entities = [{"kind": "company", **asdict(c)} for c in world.companies.values()]
    entities += [{"kind": "person", **asdict(p)} for p in world.people.values()]
    _write_jsonl(out / "entities.jsonl", entities)
    (out / "template.txt").write_text(TEMPLATE, encoding="utf-8")
    counts = {"companies": len(world.companies), "people": len(world.people), "passages": len(corpus)}
    for split, split_rows in rows.items():
        counts[split] = len(split_rows)
        counts[f"{split}_two_hop"] = sum(row["metadata"]["hops"] == 2 for row in split_rows)
    return counts


def load_world(task_dir: Path) -> World:
    """The entities of a written task, from entities.jsonl."""
    companies, people = {}, {}
    for line in (task_dir / "entities.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        kind = row.pop("kind")
        if kind == "company":
            companies[row["name"]] = Company(**row)
        else:
            people[row["name"]] = Employee(**row)
    return World(companies, people)


def question_entities(question: Question) -> set[str]:
    """Names of the people and companies a question mentions (its evidence titles and bridge answers)."""
    items = question.metadata["evidence"]
    return {item["title"] for item in items} | {item["answer"] for item in items[:-1]}


def warmstart_plans(
    questions: list[Question],
    world: World,
    *,
    early_fraction: float,
    repeat_fraction: dict[str, float],
    seed: int = 0,
) -> dict[str, TracePlan]:
    """Imperfect trace plans for a warm start that leaves IP-DPO room to improve.

    With probability `early_fraction` a two-hop question is answered after its first hop: the trace refines
    the sentence saying where the person lives and answers that city (wrong). Otherwise a question repeats
    its last search before the correct answer with the probability `repeat_fraction` gives its kind
    ("employer", "city", "two_hop"). Questions without a plan get gold traces.
    """
    if unknown := set(repeat_fraction) - set(KINDS):
        raise ValueError(f"repeat_fraction has unknown question kinds {sorted(unknown)} (kinds: {KINDS})")
    rng = random.Random(seed)
    plans = {}
    for question in questions:
        gold = TracePlan.gold(question)
        kind = question.metadata["kind"]
        if kind == "two_hop" and rng.random() < early_fraction:
            home = home_evidence(world.people[gold.searches[0].title])
            plans[question.id] = TracePlan((home,), home.answer)
        elif rng.random() < repeat_fraction.get(kind, 0.0):
            plans[question.id] = TracePlan((*gold.searches, gold.searches[-1]), gold.answer)
    return plans


# The redundant searches of the over-searching warm start (`oversearch_plans`).
HABITS = ("repeat", "paraphrase", "unneeded")
# Query rewordings of an entity title that BM25 still resolves to the same passages.
_PARAPHRASE = {"person": "{name} employer", "company": "{name} home city"}


def oversearch_plans(
    questions: list[Question],
    world: World,
    *,
    extra_searches: dict[int, Sequence[float]],
    habits: dict[str, float],
    seed: int = 0,
) -> dict[str, tuple[TracePlan, tuple[str, ...]]]:
    """Trace plans of an agent that over-searches, each with the habits behind its extra searches.

    A question of `h` hops gets `k` extra searches with probability `extra_searches[h][k]`, each after the gold
    chain (the answer is already in a refine when it runs) and each one habit drawn with the weights `habits`:
    `repeat` the last query, a `paraphrase` of it (same entity, other words), or an `unneeded` entity the
    question does not ask about (the answer's company, or another employee of the company). The answer stays
    the gold one, so the traces teach over-searching, not wrong answers. No plan (`k = 0`): a gold trace.
    """
    if unknown := set(habits) - set(HABITS):
        raise ValueError(f"habits has unknown names {sorted(unknown)} (habits: {HABITS})")
    for hops, weights in extra_searches.items():
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"extra_searches[{hops}] must be non-negative weights of 0, 1, ... extra searches"
            )
    staff: dict[str, list[Employee]] = {}
    for person in world.people.values():
        staff.setdefault(person.company, []).append(person)
    rng = random.Random(seed)
    names, weights = list(habits), list(habits.values())
    plans = {}
    for question in questions:
        gold = TracePlan.gold(question)
        counts = extra_searches.get(len(gold.searches), [1.0])
        extra = rng.choices(range(len(counts)), weights=counts)[0]
        if extra == 0:
            continue
        searches, used = list(gold.searches), []
        for habit in rng.choices(names, weights=weights, k=extra):
            extra_item = _redundant_search(habit, gold.searches[-1], question, world, staff, rng)
            searches.append(searches[-1] if habit == "repeat" else extra_item)
            used.append(habit)
        plans[question.id] = (TracePlan(tuple(searches), gold.answer), tuple(used))
    return plans


def _redundant_search(
    habit: str,
    last: Evidence,
    question: Question,
    world: World,
    staff: dict[str, list[Employee]],
    rng: random.Random,
) -> Evidence:
    """The evidence item an extra search of `habit` looks up after the chain's `last` item (its title is the
    query)."""
    if habit == "repeat":
        return last
    is_person = last.title in world.people
    if habit == "paraphrase":
        template = _PARAPHRASE["person" if is_person else "company"]
        return Evidence(template.format(name=last.title), last.text, last.answer)
    if is_person:  # the company the person works for: named already, its city not asked
        return city_evidence(world.companies[world.people[last.title].company])
    mentioned = question_entities(question)
    others = [p for p in staff.get(last.title, []) if p.name not in mentioned]
    if not others:  # a company without another employee: its own passage again
        return last
    return employer_evidence(rng.choice(sorted(others, key=lambda p: p.name)))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def hop_report(
    questions: Sequence[Question], scores: Sequence[TrajectoryScores], key: str = "hops"
) -> dict[str, dict[str, float]]:
    """Mean EM, F1, searches, model tokens, process and format scores per `metadata[key]` value and over all."""
    groups: dict[str, list[TrajectoryScores]] = {"all": list(scores)}
    for question, score in zip(questions, scores, strict=True):
        groups.setdefault(str(question.metadata.get(key, "?")), []).append(score)
    report = {}
    for name in sorted(groups):
        group = groups[name]
        report[name] = {
            "questions": len(group),
            "em": sum(s.em for s in group) / len(group),
            "f1": sum(s.outcome for s in group) / len(group),
            "searches": sum(s.steps for s in group) / len(group),
            "model_tokens": sum(s.model_tokens for s in group) / len(group),
            "process": sum(s.process for s in group) / len(group),
            "format": sum(s.format for s in group) / len(group),
        }
    return report

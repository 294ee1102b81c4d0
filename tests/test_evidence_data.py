"""Gold evidence in question files: validation with file/line/id errors, and converters per source layout.

Source rows are hand-made in the layouts FlashRAG stores: HotpotQA and 2Wiki column-wise (`{"title": [...],
"sent_id": [...]}`, converted from Hugging Face datasets) or row-wise as in the original JSON; MuSiQue as its
original `paragraphs` / `question_decomposition` objects.
"""

from __future__ import annotations

import json

import pytest

from autorefine.data import (
    DataError,
    Evidence,
    Question,
    load_hub_split,
    musique_evidence,
    prepare_training_mix,
    question_evidence,
    read_questions,
    supporting_facts_evidence,
)
from tests.helpers import DEMO_DIR


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def row(qid="q1", **metadata):
    return {"id": qid, "question": "Who?", "golden_answers": ["X"], "metadata": metadata}


HOTPOT_COLUMNS = {
    "type": "bridge",
    "level": "hard",
    "supporting_facts": {
        "title": ["Oberoi family", "The Oberoi Group", "Oberoi family"],
        "sent_id": [2, 0, 0],
    },
    "context": {
        "title": ["Oberoi family", "The Oberoi Group", "Distractor"],
        "sentences": [
            [
                "The Oberoi family is an Indian family. ",
                "It is famous for hotels. ",
                "It owns The Oberoi Group.",
            ],
            ["The Oberoi Group is a hotel company with its head office in Delhi."],
            ["Nothing to see."],
        ],
    },
}
HOTPOT_EVIDENCE = [
    Evidence(
        "Oberoi family", "The Oberoi family is an Indian family. It owns The Oberoi Group."
    ),  # sentences 0 and 2, in source order
    Evidence("The Oberoi Group", "The Oberoi Group is a hotel company with its head office in Delhi."),
]


def test_a_valid_evidence_list_is_kept_and_read_back(tmp_path):
    evidence = [{"title": "A", "text": "A works for B.", "answer": "B"}, {"title": "", "text": "B is in C."}]
    path = write_rows(tmp_path / "q.jsonl", [row(evidence=evidence, hops=2), row("q2")])
    first, second = read_questions(path)
    assert question_evidence(first) == [Evidence("A", "A works for B.", "B"), Evidence("", "B is in C.")]
    assert first.to_row()["metadata"] == {"evidence": evidence, "hops": 2}
    assert question_evidence(second) == []  # no evidence: the documented F1 / searches fallback


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ("oops", r"'metadata' must be an object, got str"),
        ({"evidence": {"title": "A"}}, r"'metadata.evidence' must be a list, got dict"),
        ({"evidence": ["A"]}, r"metadata.evidence\[0\] must be an object with 'title' and 'text', got str"),
        (
            {"evidence": [{"title": "A", "text": "t", "anwser": "B"}]},
            r"metadata.evidence\[0\] has unknown keys \['anwser'\]",
        ),
        ({"evidence": [{"text": "t"}]}, r"metadata.evidence\[0\]: 'title' must be a string, got None"),
        (
            {"evidence": [{"title": "A", "text": "t"}, {"title": "B", "text": " "}]},
            r"metadata.evidence\[1\]: 'text' must be",
        ),
        (
            {"evidence": [{"title": "A", "text": "t", "answer": 3}]},
            r"metadata.evidence\[0\]: 'answer' must be a string or null",
        ),
    ],
)
def test_malformed_evidence_names_file_line_and_id(tmp_path, metadata, fragment):
    good = {"id": "ok", "question": "Q?", "golden_answers": ["x"]}
    bad = {"id": "bad7", "question": "Q?", "golden_answers": ["x"], "metadata": metadata}
    path = write_rows(tmp_path / "q.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"q.jsonl:2 \(id bad7\): " + fragment):
        read_questions(path)


def test_hotpotqa_supporting_facts_column_wise_and_row_wise():
    assert supporting_facts_evidence(HOTPOT_COLUMNS) == HOTPOT_EVIDENCE
    rows = {
        "supporting_facts": [["Oberoi family", 2], ["The Oberoi Group", 0], ["Oberoi family", 0]],
        "context": [[t, s] for t, s in zip(*HOTPOT_COLUMNS["context"].values(), strict=True)],
    }
    assert supporting_facts_evidence(rows) == HOTPOT_EVIDENCE


def test_supporting_facts_past_the_context_are_left_out():
    metadata = {
        "supporting_facts": {
            "title": ["Oberoi family", "Oberoi family", "Missing page"],
            "sent_id": [0, 9, 0],
        },
        "context": HOTPOT_COLUMNS["context"],
    }
    assert supporting_facts_evidence(metadata) == [
        Evidence("Oberoi family", "The Oberoi family is an Indian family.")
    ]


def test_2wiki_content_column_and_evidence_triples_give_sub_answers():
    metadata = {
        "type": "compositional",
        "supporting_facts": {"title": ["Polish-Russian War (film)", "Xawery Żuławski"], "sent_id": [1, 2]},
        "context": {
            "title": ["Xawery Żuławski", "Polish-Russian War (film)"],
            "content": [
                [
                    "Xawery Żuławski is a director.",
                    "He was born in 1971.",
                    "His mother is Małgorzata Braunek.",
                ],
                ["It is a 2009 film.", "It was directed by Xawery Żuławski."],
            ],
        },
        "evidences": [
            ["Polish-Russian War (film)", "director", "Xawery Żuławski"],
            ["Xawery Żuławski", "mother", "Małgorzata Braunek"],
        ],
    }
    assert supporting_facts_evidence(metadata) == [
        Evidence("Polish-Russian War (film)", "It was directed by Xawery Żuławski.", "Xawery Żuławski"),
        Evidence("Xawery Żuławski", "His mother is Małgorzata Braunek.", "Małgorzata Braunek"),
    ]


MUSIQUE = {
    "answerable": True,
    "paragraphs": [
        {"idx": 0, "title": "Chevrolet Camaro", "paragraph_text": "A car.", "is_supporting": False},
        {
            "idx": 1,
            "title": "1967: The Last Good Year",
            "paragraph_text": "By Pierre Berton.",
            "is_supporting": True,
        },
        {"idx": 2, "title": "Pierre Berton", "paragraph_text": "He studied at UBC.", "is_supporting": True},
        {"idx": 3, "title": "Extra", "paragraph_text": "Also supporting.", "is_supporting": True},
    ],
    "question_decomposition": [
        {"id": 640262, "question": "1967 >> author", "answer": "Pierre Berton", "paragraph_support_idx": 1},
        {"id": 122868, "question": "#1 >> educated at", "answer": "UBC", "paragraph_support_idx": 2},
    ],
}
MUSIQUE_EVIDENCE = [
    Evidence("1967: The Last Good Year", "By Pierre Berton.", "Pierre Berton"),
    Evidence("Pierre Berton", "He studied at UBC.", "UBC"),
    Evidence("Extra", "Also supporting."),  # supporting but in no decomposition step: no sub-answer
]


def test_musique_decomposition_gives_paragraphs_and_sub_answers_in_both_layouts():
    assert musique_evidence(MUSIQUE) == MUSIQUE_EVIDENCE
    columns = {
        key: {field: [item[field] for item in MUSIQUE[key]] for field in MUSIQUE[key][0]}
        for key in ("paragraphs", "question_decomposition")
    }
    assert musique_evidence(columns) == MUSIQUE_EVIDENCE
    unanswerable = {
        **MUSIQUE,
        "question_decomposition": [{**MUSIQUE["question_decomposition"][0], "paragraph_support_idx": None}],
    }
    assert [e.title for e in musique_evidence(unanswerable)] == [
        "1967: The Last Good Year",
        "Pierre Berton",
        "Extra",
    ]


@pytest.mark.parametrize(
    ("source", "metadata", "fragment"),
    [
        ("hotpotqa", {"supporting_facts": {"title": ["A"], "sent_id": [0, 1]}}, "must be lists of equal length"),
        ("hotpotqa", {"supporting_facts": [["A", "zero"]]}, "not a \\(title, sentence id\\) pair"),
        ("2wikimultihopqa", {"supporting_facts": [], "context": [["A", "not a list"]]}, "not a title with a list"),
        ("musique", {**MUSIQUE, "question_decomposition": [{"answer": "x", "paragraph_support_idx": 9}]},
         "points at paragraph 9"),
    ],
)  # fmt: skip
def test_malformed_source_metadata_names_file_line_id_and_source(tmp_path, source, metadata, fragment):
    path = write_rows(tmp_path / "src.jsonl", [row("r1"), row("r2", **metadata)])
    with pytest.raises(
        DataError, match=rf"src.jsonl:2 \(id r2\): cannot read the {source} evidence.*{fragment}"
    ):
        read_questions(path, source=source)


def test_sources_without_evidence_get_an_empty_list_and_unknown_sources_nothing(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [row()])
    for source in ("nq", "triviaqa", "popqa"):
        assert read_questions(path, source=source)[0].metadata["evidence"] == []
    assert "evidence" not in read_questions(path, source="mydata")[0].metadata
    assert "evidence" not in read_questions(path)[0].metadata  # no source named: nothing is guessed
    # A row that carries evidence keeps it, whatever the source would give.
    own = write_rows(tmp_path / "own.jsonl", [row(evidence=[{"title": "T", "text": "t"}], **HOTPOT_COLUMNS)])
    assert question_evidence(read_questions(own, source="hotpotqa")[0]) == [Evidence("T", "t")]


def test_training_mix_keeps_metadata_and_fills_evidence_per_source(tmp_path):
    hotpot = write_rows(tmp_path / "hotpotqa.jsonl", [row(f"h{i}", **HOTPOT_COLUMNS) for i in range(6)])
    nq = write_rows(
        tmp_path / "nq.jsonl", [{"id": f"n{i}", "question": "Q?", "golden_answers": ["a"]} for i in range(6)]
    )
    out = tmp_path / "prepared"
    prepare_training_mix({"hotpotqa": hotpot, "nq": nq}, out, val_size=2, seed=0)
    rows = read_questions(out / "train.jsonl") + read_questions(out / "val.jsonl")
    by_source = {q.metadata["source"]: q for q in rows}
    assert question_evidence(by_source["hotpotqa"]) == HOTPOT_EVIDENCE
    assert by_source["hotpotqa"].metadata["supporting_facts"] == HOTPOT_COLUMNS["supporting_facts"]  # kept
    assert by_source["nq"].metadata == {"source": "nq", "evidence": []}


def test_hub_reader_keeps_metadata_adds_evidence_and_refreshes_old_caches(tmp_path, monkeypatch):
    import datasets

    # The hub cannot be reached here: a real `datasets.Dataset` in the FlashRAG schema stands in for it.
    hub = datasets.Dataset.from_list([row("dev_0", **HOTPOT_COLUMNS), row("dev_1", **HOTPOT_COLUMNS)])
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    stale = tmp_path / "hotpotqa" / "dev.jsonl"
    stale.parent.mkdir()
    stale.write_text('{"id": "dev_0", "question": "Who?", "golden_answers": ["X"]}\n', encoding="utf-8")
    path = load_hub_split("hotpotqa", "dev", tmp_path)
    assert path == stale and calls == [("RUC-NLPIR/FlashRAG_datasets", "hotpotqa", "dev")]
    first = read_questions(path)[0]
    assert question_evidence(first) == HOTPOT_EVIDENCE
    assert first.metadata["level"] == "hard" and first.metadata["context"]["title"][2] == "Distractor"
    assert load_hub_split("hotpotqa", "dev", tmp_path) == path and len(calls) == 1  # now cached


def test_hub_rows_with_bad_evidence_name_the_dataset_split_and_row(tmp_path, monkeypatch):
    import datasets

    hub = datasets.Dataset.from_list([row("dev_0", supporting_facts=[["A", "x"]])])
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: hub)
    with pytest.raises(DataError, match=r"FlashRAG_datasets/hotpotqa/dev row 1 \(id dev_0\): cannot read"):
        load_hub_split("hotpotqa", "dev", tmp_path)
    assert not (tmp_path / "hotpotqa" / "dev.jsonl").exists()


def test_demo_hotpotqa_questions_carry_their_supporting_paragraphs():
    passages = {
        json.loads(line)["contents"] for line in (DEMO_DIR / "corpus.jsonl").read_text("utf-8").splitlines()
    }
    normalized = {" ".join(p.split()) for p in passages}
    questions = read_questions(DEMO_DIR / "hotpotqa_train.jsonl") + read_questions(
        DEMO_DIR / "hotpotqa_dev.jsonl"
    )
    assert len(questions) == 500
    for question in questions:
        evidence = question_evidence(question)
        assert [e.title for e in evidence] == question.metadata["supporting_titles"] and len(evidence) == 2
        assert all(" ".join(f'"{e.title}"\n{e.text}'.split()) in normalized for e in evidence)


def test_evidence_round_trips_through_question_rows():
    question = Question("x", "Q?", ["a"], {"evidence": [Evidence("T", "t", "a").to_dict()]})
    assert question.to_row()["metadata"]["evidence"] == [{"title": "T", "text": "t", "answer": "a"}]
    assert Evidence("T", "t").to_dict() == {"title": "T", "text": "t"}

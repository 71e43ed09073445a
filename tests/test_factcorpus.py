"""`medit corpus`: a statistics corpus of text paragraphs plus a training split's true facts,
without the cases of the evaluation set (no model involved)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medit.cli import app
from medit.errors import ValidationError
from medit.toolkit.fact_corpus import build_corpus, write_corpus
from medit.toolkit.stats import Corpus


def _cf(i: int, subject: str, prompt: str, truth: str, loc: str, loc_truth: str, rephrase: str = "") -> dict:
    return {"case_id": i, "prompt": prompt, "subject": subject, "target_new": "Nowhere", "ground_truth": truth,
            "rephrase_prompt": rephrase or f"Where is {subject}?", "locality_prompt": loc,
            "locality_ground_truth": loc_truth}


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    train = [_cf(0, "Biure", "Biure, which is located in", "Spain", "Girona, which is located in", "Spain"),
             # its subject occurs in an evaluation case's locality prompt: left out
             _cf(1, "Lyon", "Lyon is a twin city of", "Beirut", "Turin is a twin city of", "Lyon"),
             # an evaluation subject occurs in its locality prompt: left out
             _cf(2, "Oslo", "Oslo is the capital of", "Norway", "Toko Yasuda plays the", "guitar"),
             _cf(3, "Kharkiv", "Kharkiv is a twin city of", "Cincinnati", "Perm is a twin city of", "Oxford")]
    dev = [_cf(0, "Toko Yasuda", "Toko Yasuda, the", "guitar", "What is the twin city of Lyon? It is", "Beirut")]
    paths = {"train": tmp_path / "train.json", "dev": tmp_path / "dev.json", "text": tmp_path / "wiki.txt"}
    paths["train"].write_text(json.dumps(train))
    paths["dev"].write_text(json.dumps(dev))
    paths["text"].write_text(" = Heading = \nFirst paragraph .\n\nSecond paragraph .\nThird paragraph .\n")
    return {k: f"counterfact:{v}" if k != "text" else str(v) for k, v in paths.items()}


def test_facts_follow_the_text_and_leave_out_the_evaluation_subjects(files, tmp_path):
    lines, counts = build_corpus(files["train"], [files["dev"]], text=files["text"], text_n=2)
    assert lines == ["First paragraph .", "Second paragraph .",
                     "Biure, which is located in Spain.", "Girona, which is located in Spain.",
                     "Kharkiv is a twin city of Cincinnati.", "Perm is a twin city of Oxford."]
    assert counts == {"text": 2, "facts": 4, "cases_read": 4, "excluded_cases": 2}
    # without exclusion every case's facts are kept; facts_n caps the fact lines
    lines, counts = build_corpus(files["train"], facts_n=3)
    assert len(lines) == 3 and counts["excluded_cases"] == 0 and lines[2] == "Lyon is a twin city of Beirut."
    # the written file reads back as the same samples through the statistics corpus reader
    path = write_corpus(["a\nb", "c"], tmp_path / "out" / "c.txt")
    assert Corpus(str(path)).paragraphs(10) == ["a b", "c"]


def test_nothing_left_and_bad_counts_are_refused(files):
    with pytest.raises(ValidationError, match="no fact"):
        build_corpus(files["dev"], [files["dev"]])
    with pytest.raises(ValidationError, match="--facts-n"):
        build_corpus(files["train"], facts_n=0)


def test_corpus_command(files, tmp_path):
    out = tmp_path / "mix.txt"
    res = CliRunner().invoke(app, ["corpus", "--facts", files["train"], "--exclude", files["dev"],
                                   "--text", files["text"], "--text-n", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().splitlines()[:2] == ["First paragraph .", "Biure, which is located in Spain."]
    assert f"--stats-corpus {out} --set stats_samples=5" in res.output
    res = CliRunner().invoke(app, ["corpus", "--facts", str(tmp_path / "missing.json"), "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output

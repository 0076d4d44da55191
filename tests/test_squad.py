"""SQuAD v1.1 as generation, in-context demonstrations and the task table.

The metric tests are the official SQuAD v1.1 definitions worked by hand; the
data tests read the offline dev set in place (skipped without ../shared/data);
training and decoding run on the tiny random Llama.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import SHARED_DATA, synthetic_examples
from zotune.cli import main
from zotune.errors import ZOError
from zotune.metrics import exact_match, f1, normalize_answer, score_split, squad_scores
from zotune.tasks import Example, load_task
from zotune.tasks.icl import SEPARATOR, demonstration, with_demonstrations
from zotune.tasks.squad import split_articles, squad_prompt

needs_squad = pytest.mark.skipif(not (SHARED_DATA / "SQuAD").exists(), reason="../shared/data/SQuAD not present")


@pytest.fixture(scope="module")
def squad():
    return load_task("squad", SHARED_DATA)


# -- metrics: the official definitions, by hand ------------------------------------------------------

def test_normalization_lowercases_and_drops_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert normalize_answer("U.S. $1,000") == "us 1000"


def test_exact_match_after_normalization():
    assert exact_match("the Eiffel Tower", "Eiffel tower") == 1.0
    assert exact_match("Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Towers", "Eiffel Tower") == 0.0


def test_f1_is_the_harmonic_mean_of_word_precision_and_recall():
    # pred {denver, broncos, won} vs gold {denver, broncos}: P = 2/3, R = 1 -> F1 = 0.8
    assert f1("Denver Broncos won", "the Denver Broncos") == pytest.approx(0.8)
    # pred {broncos} vs gold {denver, broncos}: P = 1, R = 1/2 -> 2/3
    assert f1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    # words count with multiplicity: "go go go" vs "go" shares 1 word: P = 1/3, R = 1 -> F1 = 0.5
    assert f1("go go go", "go") == pytest.approx(0.5)
    assert f1("Carolina Panthers", "Denver Broncos") == 0.0
    assert f1("", "Denver Broncos") == 0.0


def test_scores_take_the_best_gold_answer_and_average_over_questions():
    golds = [("Denver Broncos", "Broncos"), ("Carolina Panthers", "the Panthers"), ("Levi's Stadium",)]
    preds = ["Broncos", "Panthers", "Santa Clara"]
    scores = squad_scores(preds, golds)
    # EM: 1 (Broncos), 1 (Panthers == the Panthers), 0 ; F1: 1, 1, 0
    assert scores["em"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    # F1 of "Denver" against ("Denver Broncos", "Broncos"): max(2/3, 0); EM 0
    assert squad_scores(["Denver"], [("Denver Broncos", "Broncos")]) == {"f1": pytest.approx(2 / 3), "em": 0.0}
    with pytest.raises(ZOError):
        squad_scores(["x"], [])


# -- the task: split, prompt ---------------------------------------------------------------------------

def test_article_split_is_deterministic_and_independent_of_file_order():
    titles = [f"Article_{i}" for i in range(48)]
    split = split_articles(titles)
    shuffled = titles[:]
    random.Random(5).shuffle(shuffled)
    assert split_articles(shuffled) == split
    assert [len(split[s]) for s in ("train", "dev", "test")] == [32, 8, 8]
    assert sorted(split["train"] + split["dev"] + split["test"]) == sorted(titles)


@needs_squad
def test_squad_splits_the_dev_set_by_article_disjointly(squad):
    assert (len(squad.train), len(squad.dev), len(squad.test)) == (7496, 1164, 1910)  # 10,570 questions in all
    title = lambda e: e.prompt.split("\n", 1)[0]
    by_split = {s: {title(e) for e in getattr(squad, s)} for s in ("train", "dev", "test")}
    assert [len(by_split[s]) for s in ("train", "dev", "test")] == [32, 8, 8]
    assert not (by_split["train"] & by_split["dev"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["dev"] & by_split["test"])
    again = load_task("squad", SHARED_DATA)
    assert again.train == squad.train and again.dev == squad.dev and again.test == squad.test
    assert all(e.answers and not e.candidates for e in squad.train + squad.dev + squad.test)


@needs_squad
def test_squad_prompt_is_meZOs_template(squad):
    from zotune.generation import target_text

    ex = next(e for e in squad.train if "Which NFL team represented the AFC at Super Bowl 50?" in e.prompt)
    assert ex.prompt.startswith("Title: Super_Bowl_50\nContext: Super Bowl 50 was an American football game to "
                                "determine the champion of the National Football League (NFL) for the 2015 season.")
    assert ex.prompt.endswith('so that the logo could prominently feature the Arabic numerals 50.\n'
                              "Question: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:")
    assert ex.answers == ("Denver Broncos",)  # three identical gold answers, deduplicated
    assert target_text(ex) == " Denver Broncos\n"
    assert squad_prompt("T", "C", " Q? ") == "Title: T\nContext: C\nQuestion: Q?\nAnswer:"


# -- training and decoding on the tiny model -------------------------------------------------------------

def generation_examples(n: int, seed: int = 0) -> list[Example]:
    """The synthetic sentiment rule as generation: answer "great movie" or "terrible film"."""
    return [Example(e.prompt, (), 0, ("great movie" if e.label else "terrible film",))
            for e in synthetic_examples(n, seed)]


def test_teacher_forcing_loss_drops_when_training_the_tiny_model(tiny_llama):
    from zotune.config import TrainConfig
    from zotune.engine import ZOEngine
    from zotune.evaluate import Scorer
    from zotune.generation import answer_nll
    from zotune.methods import get_method
    from zotune.models import load_model
    from zotune.optim import ZOSGD

    model, tok, _ = load_model(str(tiny_llama))
    method = get_method("mezo")(TrainConfig.make(method="mezo"))
    model = method.prepare(model)
    scorer = Scorer(model, tok)
    train = generation_examples(64, seed=1)
    # Scorer.loss on generation examples is the mean over examples of the answer's mean token NLL
    with torch.no_grad():
        assert scorer.loss(train[:4]) == pytest.approx(float(answer_nll(model, tok, train[:4]).mean()), rel=1e-6)
    before = score_split(scorer, train, 16)
    assert before.metric == "f1" and before.value == 0.0  # the random model repeats one word
    engine = ZOEngine(method, ZOSGD(), eps=1e-3, seed=0)
    start = scorer.loss(train)
    for step in range(100):
        batch = train[(step * 16) % 64 : (step * 16) % 64 + 16]
        engine.step(lambda: scorer.loss(batch), lr=3e-3)
    # measured: 3.61 -> 2.42 with per-tensor Gaussian draws, 3.61 -> 2.75 with the block-seeded draws (issue 15)
    assert scorer.loss(train) < 0.8 * start
    after = score_split(scorer, train, 16)
    assert after.value > 0.0 and len(after.predictions) == 64  # answers' words start to appear (measured F1 0.076)


def test_greedy_decoding_is_batch_independent_and_bounded(tiny_llama):
    from zotune.generation import greedy_generate
    from zotune.models import load_model

    model, tok, _ = load_model(str(tiny_llama))
    prompts = [e.prompt for e in generation_examples(6)] + ["the movie was good and the plot It was"]
    one_by_one = [greedy_generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=3) == one_by_one
    assert all(len(tok(p, add_special_tokens=False).input_ids) <= 5 for p in one_by_one)


# -- in-context demonstrations -------------------------------------------------------------------------------

def test_icl_prompt_holds_n_demonstrations_deterministic_for_a_seed():
    pool = generation_examples(20, seed=3)
    query = generation_examples(2, seed=4)
    a = with_demonstrations(query, pool, 3, seed=7)
    assert a == with_demonstrations(query, pool, 3, seed=7)
    assert a != with_demonstrations(query, pool, 3, seed=8)
    for q, e in zip(query, a):
        demos = e.prompt[: -len(q.prompt)].split(SEPARATOR)
        assert demos[-1] == "" and len(demos) == 4  # three demonstrations, each followed by a blank line
        assert all(d.endswith((" great movie", " terrible film")) for d in demos[:3])
        assert e.prompt.endswith(SEPARATOR + q.prompt) and e.answers == q.answers
    assert with_demonstrations(query, pool, 0) == query
    with pytest.raises(ZOError, match="only 20"):
        with_demonstrations(query, pool, 21)


def test_classification_demonstrations_end_with_the_gold_candidate():
    ex = Example("Is it? Yes or No?\n", ("Yes", "No"), 1)
    assert demonstration(ex) == "Is it? Yes or No?\nNo"
    [out] = with_demonstrations([Example("Q\n", ("Yes", "No"), 0)], [ex], 1)
    assert out.prompt == "Is it? Yes or No?\nNo\n\nQ\n" and out.candidates == ("Yes", "No")


@needs_squad
def test_squad_icl_prompt_holds_n_gold_answered_articles(squad):
    [out] = with_demonstrations(squad.dev[:1], squad.train, 2, seed=0)
    assert out.prompt.count("Title: ") == 3 and out.prompt.count("\nAnswer:") == 3
    demos = random.Random(0).sample(squad.train, 2)
    assert out.prompt.startswith(demos[0].prompt + " " + demos[0].answers[0] + SEPARATOR + demos[1].prompt)


# -- end to end on the command line ----------------------------------------------------------------------------

@needs_squad
def test_cli_trains_and_evaluates_squad_with_f1(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_llama), "--task", "squad", "--data-dir", str(SHARED_DATA),
                 "--method", "mezo-lora", "--steps", "2", "--batch-size", "2", "--train-size", "8",
                 "--dev-size", "3", "--test-size", "2", "--max-length", "64", "--eval-batch-size", "4",
                 "--output-dir", str(out), "--progress", "false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dev f1" in printed and "test f1" in printed and "dev accuracy" not in printed
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "dev_acc" in line]
    assert [e["step"] for e in evals] == [0, 2] and all(e["metric"] == "f1" and "dev_em" in e for e in evals)
    assert json.loads((out / "summary.json").read_text())["metric"] == "f1"

    code = main(["eval", "--model", str(tiny_llama), "--task", "squad", "--data-dir", str(SHARED_DATA),
                 "--size", "3", "--max-length", "64", "--icl", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "f1" and result["n"] == 3 and result["icl"] == 1
    assert 0.0 <= result["value"] <= 1.0 and 0.0 <= result["em"] <= result["value"] + 1e-9


@needs_squad
def test_tasks_command_lists_splits_sizes_sources_and_notes(capsys):
    assert main(["tasks", "--data-dir", str(SHARED_DATA)]) == 0
    text = capsys.readouterr().out
    squad_block = text[text.index("squad  [f1]"):].split("\n")
    assert squad_block[1].split()[:2] == ["train", "7496"] and "dev-v1.1.json" in squad_block[1]
    assert "SQuAD: only the official dev set exists offline; dev split by article" in text
    assert "ReCoRD: only a 32-example train file" in text
    record = text[text.index("record  [accuracy]"):].split("\n")
    assert record[3].split() == ["test", "-", "missing"]
    assert f"{SHARED_DATA}/CB/val.jsonl" in text


def test_tasks_command_says_missing_when_the_data_is_absent(tmp_path, capsys):
    assert main(["tasks", "--data-dir", str(tmp_path), "--json"]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["squad"]["splits"]["train"]["source"].startswith("missing (SQuAD file not found")
    assert rows["cb"]["metric"] is None and rows["cb"]["splits"]["test"]["size"] == 0

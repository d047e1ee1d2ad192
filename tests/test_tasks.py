import json
import os
import random
from collections import Counter
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # also done by tests/conftest.py when present
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is absent (real task files)")

import tasks  # noqa: E402
from tasks import (extract_letter, extract_number, extract_yesno, extract_choice, has_runaway_repetition,  # noqa: E402
                   load_task, make_addition, permute_options, grade, wilson_interval, format_mcq)


def test_format_mcq_unchanged():
    assert format_mcq(" Q? ", {"A": "x", "B": "y"}) == "Question: Q?\nA. x\nB. y\nAnswer:"


LETTER_CASES = [
    (" B", "B"), ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[c]", "C"), ("**C**", "C"), (" B\n", "B"),
    ("The answer is C", "C"), ("The answer is C.", "C"), ("Answer: D) foo", "D"), ("answer: (d)", "D"),
    ("The correct answer is: (C) foo", "C"), ("Option A", "A"), ("I choose option b)", "B"),
    ("the answer is b.", "B"), ("the answer is a drug that blocks", None), ("answer is Cisplatin", None),
    (" a patient with fever", None), ("A 45-year-old man", None), ("A. Disclose the error", "A"),
    ("A is correct", "A"), ("a) foo", "A"), ("(a)", "A"), ("b. foo", "B"),
    (" B Tell the attending that he cannot", "B"), ("D Refuse to dictate", "D"),
    ("B or C", "B"), ("Either B or C", "B"), ("I think B is right", "B"), ("I'd say C", "C"),
    ("vitamin C deficiency", None), ("e.g. foo", None), ("Bacteria", None), ("nothing here", None), ("", None),
    ("E", None), ("The answer is E, no wait, B", "B"),
    ("Vitamin C is wrong; the answer is B", "B"), (" C\n\nQuestion: next\nA. y", "C"),
]


@pytest.mark.parametrize("text,want", LETTER_CASES)
def test_extract_letter(text, want):
    assert extract_letter(tasks.cut_at_stop(text), "ABCD") == want


def test_extract_letter_valid_set():
    assert extract_letter("E", "ABCDE") == "E"
    assert extract_letter("The answer is E", "ABCDE") == "E"


@pytest.mark.parametrize("text,want", [
    ("Yes.", "yes"), (" no, because", "no"), ("maybe", "maybe"), ("The answer is no", "no"),
    ("There was no difference. Answer: maybe", "maybe"), ("MAYBE", "maybe"), ("nothing", None),
    ("Not sure", None), ("Nobody knows", None),
])
def test_extract_yesno(text, want):
    assert extract_yesno(text) == want


def test_extract_choice_pubmedqa_style():
    opts = {"A": "yes", "B": "no", "C": "maybe"}
    assert extract_choice(" yes", opts) == "A"
    assert extract_choice(" No. A randomized trial showed", opts) == "B"
    assert extract_choice(" C", opts) == "C"
    assert extract_choice(" the data suggest maybe", opts) == "C"
    assert extract_choice(" hmm", opts) is None
    # shuffled options: the word follows its option
    assert extract_choice(" yes", {"A": "maybe", "B": "yes", "C": "no"}) == "B"


def test_extract_choice_option_text():
    opts = {"A": "Inhibition of proteasome", "B": "Cross-linking of DNA"}
    assert extract_choice(" Cross-linking of DNA.\nmore", opts) == "B"
    assert extract_choice(" Something else", opts) is None


@pytest.mark.parametrize("text,want", [
    ("#### 72", "72"), ("so 5+5=10\n#### 10", "10"), ("####72", "72"), ("#### $1,080.", "1080"),
    ("#### 1,000.50", "1000.5"), ("#### 10.0", "10"), ("#### -3", "-3"), ("#### $-3", "-3"),
    ("#### 0.50", "0.5"), ("#### 2,520,000", "2520000"), ("#### 7\n\nQuestion: 9 apples", "7"),
    ("He pays $1,000.50 in total.", "1000.5"), ("12 apples and 7", "7"), ("x = -3.", "-3"),
    ("The answer is 5-3 = 2", "2"), ("1,2,3", "3"), ("no numbers", None), ("#### ", None),
    ("It is 45%", "45"), ("−4", "-4"), ("#### 18 dollars, not 20", "18"),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_extract_number_strict():
    assert extract_number("the answer is 5", strict=True) is None
    assert extract_number("#### 5", strict=True) == "5"


def test_normalize_number():
    n = tasks.normalize_number
    assert n("10.0") == n("10") == "10"
    assert n("1,000.50") == "1000.5" and n("$3.") == "3" and n("-0.0") == "0" and n("abc") is None


def test_grade_numbers_and_letters():
    ex = {"task": "gsm8k", "answer": "10"}
    assert grade("gsm8k", " 2*5 = 10.0\n#### 10.0", ex) == (1.0, True)
    assert grade("gsm8k", " #### $10", ex) == (1.0, True)
    assert grade("gsm8k", " #### 11", ex) == (0.0, True)
    assert grade("gsm8k", " I don't know", ex) == (0.0, False)
    mcq = {"task": "medqa", "answer": "B", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}
    assert grade("medqa", " B", mcq) == (1.0, True) and grade(None, " (b)", mcq) == (1.0, True)
    assert grade("medqa", " C", mcq) == (0.0, True)
    assert grade("medqa", " a patient", mcq) == (0.0, False)
    add = {"task": "addition", "answer": "4690"}
    assert grade("addition", " 4690\nQ: 1+1=\nA: 2", add) == (1.0, True)
    assert grade("addition", " 4691", add) == (0.0, True)


def test_runaway_repetition():
    assert has_runaway_repetition(" B B B B B B B B B B B B")
    assert has_runaway_repetition("The answer is B. " * 5)
    assert has_runaway_repetition([1, 2, 3] * 10)
    assert not has_runaway_repetition(list(range(200)))
    assert not has_runaway_repetition(" B")
    assert not has_runaway_repetition("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips. #### 72")
    assert has_runaway_repetition("The answer is B. " * 3)
    assert not has_runaway_repetition(" B B B B B B B B B B")  # 10 tokens: under min_span
    assert has_runaway_repetition(list(range(40)) * 3)  # a looping paragraph (n-gram rule)
    assert not has_runaway_repetition([])


def test_runaway_repetition_matches_a_loop_over_periods():
    """The all-periods-at-once numpy form against the rule written as plain loops, on random sequences of few distinct
    tokens with repeated units spliced in (ngram rule off: only the periodic one differs in form)."""
    def by_loops(a, max_period=32, min_repeats=3, min_span=12):
        for p in range(1, min(max_period, len(a) // min_repeats) + 1):
            run = 0
            for i in range(len(a) - p):
                run = run + 1 if a[i + p] == a[i] else 0
                if run + p >= max(p * min_repeats, min_span):
                    return True
        return False
    rng = random.Random(0)
    flagged = 0
    for _ in range(400):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
        if rng.random() < 0.5:
            unit = [rng.randrange(9) for _ in range(rng.randrange(1, 8))]
            at = rng.randrange(len(seq))
            seq[at:at] = unit * rng.randrange(1, 6)
        expected = by_loops(seq)
        flagged += expected
        assert has_runaway_repetition(seq, ngram=0) == expected, seq
    assert 50 < flagged < 350  # both outcomes well represented


def test_runaway_repetition_rows_match_counted_ngrams_and_one_row_at_a_time():
    """runaway_repetition_rows (what grpo.score() calls, rows of different lengths padded into one array) against the
    n-gram rule written with a Counter (periodic rule off), and against each row alone (both rules)."""
    def ngram_by_counter(a, ngram, count):
        windows = Counter(tuple(a[i:i + ngram]) for i in range(len(a) - ngram + 1))
        return bool(windows) and max(windows.values()) >= count
    rng = random.Random(1)
    rows = []
    for _ in range(600):
        seq = [rng.randrange(rng.choice([2, 5, 50])) for _ in range(rng.randrange(0, 70))]
        if rng.random() < 0.5:
            unit = [rng.randrange(9) for _ in range(rng.randrange(1, 25))]
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(len(seq) + 1)
                seq[at:at] = unit
        rows.append(seq)
    for ngram, count in ((16, 3), (16, 2), (8, 2), (6, 3)):
        expected = [ngram_by_counter(r, ngram, count) for r in rows]
        got = tasks.runaway_repetition_rows(rows, max_period=0, ngram=ngram, max_ngram_count=count)
        assert got.tolist() == expected
        assert 10 < sum(expected) < 590  # both outcomes represented
    together = tasks.runaway_repetition_rows(rows)
    assert together.tolist() == [has_runaway_repetition(r) for r in rows]
    long_rows = [(r * 9)[:rng.randrange(200, 300)] for r in rows[:120]] * 8  # > 4M (position, period, row) elements:
    together = tasks.runaway_repetition_rows(long_rows)                       # the periodic rule runs in row chunks
    assert together.tolist() == [has_runaway_repetition(r) for r in long_rows] and 0 < together.sum() < len(long_rows)


@needs_shared
def test_runaway_repetition_rare_on_real_text():
    sols = [tasks.example_text(e) for e in load_task("gsm8k", os.path.join(SHARED, "gsm8k/train.jsonl"))]
    assert sum(map(has_runaway_repetition, sols)) <= 10  # of 7,473
    abstracts = [e["prompt"] for e in load_task("pubmedqa", os.path.join(SHARED, "pubmedqa/train.jsonl"))]
    assert not any(map(has_runaway_repetition, abstracts))


def test_permute_options_keeps_answer_text():
    opts = {"A": "w", "B": "x", "C": "y", "D": "z"}
    for s in range(50):
        new, ans = permute_options(opts, "C", random.Random(s))
        assert new[ans] == "y" and sorted(new.values()) == sorted(opts.values()) and list(new) == list("ABCD")
    for t in "ABCD":
        new, ans = permute_options(opts, "C", random.Random(0), target=t)
        assert ans == t and new[t] == "y"


def test_addition_answers_and_split():
    train = make_addition(3000, seed=0, digits=(1, 4))
    ev = make_addition(500, seed=1, split="eval")
    for ex in train + ev:
        a, b = ex["a"], ex["b"]
        assert ex["prompt"] == f"Q: {a}+{b}=\nA:" and int(ex["answer"]) == a + b
        assert 0 <= a < 10 ** 4 and 0 <= b < 10 ** 4
        assert grade("addition", " " + ex["answer"], ex)[0] == 1.0
    assert not {(e["a"], e["b"]) for e in train} & {(e["a"], e["b"]) for e in ev}
    assert make_addition(10, seed=0) == make_addition(10, seed=0)
    assert all(len(str(e["a"])) == 3 for e in make_addition(50, digits=3))


def test_wilson():
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.32
    s = tasks.summarize([1, 0, 1, 1], [1, 1, 1, 0])
    assert s["acc"] == 0.75 and s["unparsable"] == 0.25


def test_synth_cli(tmp_path):
    out = tmp_path / "add.jsonl"
    subprocess.run([sys.executable, os.path.join(ROOT, "tasks.py"), "synth", "--task", "addition", "--n", "100",
                    "--digits", "2-3", "--out", str(out)], check=True, capture_output=True)
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 100 and all(set(r) == {"text"} for r in rows)
    q, a = rows[0]["text"].split("=\nA: ")
    x, y = q[3:].split("+")
    assert int(x) + int(y) == int(a)
    ev = tmp_path / "ev.jsonl"
    subprocess.run([sys.executable, os.path.join(ROOT, "tasks.py"), "synth", "--task", "addition", "--n", "20",
                    "--seed", "1", "--split", "eval", "--format", "prompt", "--out", str(ev)], check=True)
    exs = load_task("addition", str(ev))
    assert len(exs) == 20 and all(grade("addition", " " + e["answer"], e)[0] == 1.0 for e in exs)


# ------------------------------------------------------------------ real files

@needs_shared
def test_gsm8k_all_answers_parse():
    rows = [json.loads(l) for l in open(os.path.join(SHARED, "gsm8k/train.jsonl"))]
    exs = load_task("gsm8k", os.path.join(SHARED, "gsm8k/train.jsonl"))
    assert len(exs) == len(rows) == 7473
    for r, e in zip(rows, exs):
        raw = r["answer"].split("####")[-1].strip().replace(",", "")
        assert e["answer"] is not None and float(e["answer"]) == float(raw)
        assert e["prompt"] == f"Question: {r['question'].strip()}\nAnswer:"
        assert grade("gsm8k", " " + e["solution"], e)[0] == 1.0  # the reference solution earns the reward
        assert "<<" not in e["solution"]
    assert exs[0]["answer"] == "72"


@needs_shared
@pytest.mark.parametrize("rel", ["medqa/dev.jsonl", "medmcqa/questions.jsonl", "pubmedqa/train.jsonl"])
def test_mcq_shuffle_on_real_rows(rel):
    name = {"medqa": "medqa", "medmcqa": "medmcqa", "pubmedqa": "pubmedqa"}[rel.split("/")[0]]
    path = os.path.join(SHARED, rel)
    plain = load_task(name, path)
    shuf = load_task(name, path, shuffle_options=True, seed=3)
    assert len(plain) == len(shuf)
    moved = 0
    for p, s in zip(plain, shuf):
        assert p["prompt"].startswith("Question: ") and p["prompt"].endswith("\nAnswer:")
        assert p["options"][p["answer"]] == p["answer_text"]
        assert s["options"][s["answer"]] == p["answer_text"] == s["answer_text"]  # answer text follows its letter
        assert sorted(map(str, s["options"].values())) == sorted(map(str, p["options"].values()))
        assert f"\n{s['answer']}. {str(s['answer_text']).strip()}\n" in s["prompt"]
        assert grade(name, " " + s["answer"], s)[0] == 1.0
        moved += s["answer"] != p["answer"]
    assert moved > len(plain) * 0.4  # options really move
    # deterministic, and a subset keeps the same permutation for the same rows
    assert load_task(name, path, shuffle_options=True, seed=3) == shuf
    sub = load_task(name, path, n=10, seed=3, shuffle_options=True)
    assert all(e == shuf[e["id"]] for e in sub)
    pinned = load_task(name, path, n=20, shuffle_options="B")
    assert all(e["answer"] == "B" and e["options"]["B"] == plain[e["id"]]["answer_text"] for e in pinned)


@needs_shared
def test_pubmedqa_words():
    exs = load_task("pubmedqa", os.path.join(SHARED, "pubmedqa/train.jsonl"))
    assert len(exs) == 450
    for e in exs:
        assert grade("pubmedqa", " " + e["answer_text"], e)[0] == 1.0
        assert grade("pubmedqa", " " + e["answer_text"].capitalize() + ".", e)[0] == 1.0


@needs_shared
def test_show_cli():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tasks.py"), "show", "medqa",
                        os.path.join(SHARED, "medqa/dev.jsonl")], check=True, capture_output=True, text=True)
    assert r.stdout.count("\nAnswer:") == 2

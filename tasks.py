"""Verifiable tasks: prompt formatting, answer extraction and rewards (MedQA/MedMCQA/PubMedQA, GSM8K, synthetic).

Every loader returns plain dicts {"task", "id", "prompt", "answer", ...};
grade(task, completion, example) -> (reward 1.0/0.0, parsable).
Plain functions on plain dicts, because grpo.py, eval and prepare_data.py all just need prompt/answer pairs.

    python tasks.py show medqa data/medqa/dev.jsonl [-n 2] [--shuffle]
    python tasks.py synth --task addition --n 200000 --out data/addition.jsonl     # {"text"} pretraining rows
    python tasks.py synth --task addition --n 1000 --seed 1 --split eval --format prompt --out data/addition_eval.jsonl
    python tasks.py synth --task gsm8k --path data/gsm8k/train.jsonl --out data/gsm8k.jsonl  # real tasks too
"""
import argparse
import json
import math
import random
import re
import zlib
from collections import Counter
from decimal import Decimal, InvalidOperation

import numpy as np

LETTERS = "ABCDEFGHIJ"
MCQ_TASKS = ("medqa", "medmcqa", "pubmedqa")
TASKS = MCQ_TASKS + ("gsm8k", "addition")
# A completion is cut at the first of these: the model tends to go on with the next few-shot-like item.
STOP_STRINGS = ("\nQuestion:", "\nQ:", "<|endoftext|>")


def format_mcq(question, options):
    """The one multiple-choice layout used for pretraining text and GRPO prompts alike; ends with 'Answer:'."""
    lines = [f"Question: {question.strip()}"]
    lines += [f"{k}. {str(v).strip()}" for k, v in options.items()]
    return "\n".join(lines) + "\nAnswer:"


def format_gsm8k(question):
    return f"Question: {question.strip()}\nAnswer:"


def format_addition(a, b):
    return f"Q: {a}+{b}=\nA:"


# ----------------------------------------------------------------------------- loading

def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def permute_options(options, answer_idx, rng, target=None):
    """Shuffle MCQ options with `rng`, relabel them A, B, ... and return (new_options, new_answer_letter).
    target='C' forces the correct option onto letter C (others random), to measure position bias."""
    keys = list(options)
    order = list(range(len(keys)))
    rng.shuffle(order)
    correct = keys.index(answer_idx)
    if target is not None:
        t = LETTERS.index(target)
        j = order.index(correct)
        order[j], order[t] = order[t], order[j]
    letters = LETTERS[:len(keys)]
    new = {letters[i]: options[keys[k]] for i, k in enumerate(order)}
    return new, letters[order.index(correct)]


def mcq_example(row, task="medqa", id=None, shuffle_options=False, seed=0):
    """Raw {question, options{A..}, answer_idx} -> uniform example. shuffle_options: False, True or a target letter."""
    options, ans = dict(row["options"]), row["answer_idx"]
    if shuffle_options:
        rng = random.Random(f"{seed}-{id}-{row['question'][:64]}")  # stable per question, whatever n/order
        options, ans = permute_options(options, ans, rng, None if shuffle_options is True else shuffle_options)
    return {"task": task, "id": id, "prompt": format_mcq(row["question"], options), "answer": ans,
            "answer_text": str(options[ans]), "options": options, "question": row["question"]}


def gsm8k_example(row, id=None):
    sol = row["answer"]
    return {"task": "gsm8k", "id": id, "prompt": format_gsm8k(row["question"]),
            "answer": extract_number(sol, strict=True), "question": row["question"],
            "solution": re.sub(r"<<[^>]*>>", "", sol).strip()}  # calculator annotations <<a*b=c>> dropped


def make_addition(n, seed=0, digits=(1, 4), split="train"):
    """n synthetic a+b examples; each operand gets a uniform digit count in digits=(lo, hi) (or an int).
    Train and eval are disjoint: a pair is 'eval' iff crc32('a+b') % 10 == 0, whatever the seed."""
    lo, hi = (digits, digits) if isinstance(digits, int) else digits
    rng, out = random.Random(f"addition-{seed}"), []

    def operand():
        d = rng.randint(lo, hi)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

    while len(out) < n:
        a, b = operand(), operand()
        if (zlib.crc32(f"{a}+{b}".encode()) % 10 == 0) != (split == "eval"):
            continue
        out.append({"task": "addition", "id": len(out), "prompt": format_addition(a, b), "answer": str(a + b),
                    "a": a, "b": b})
    return out


# HF datasets as an alternative source (needs network or an HF cache); local jsonl files are the tested path.
HF_SOURCES = {"medqa": ("GBaker/MedQA-USMLE-4-options", None), "medmcqa": ("openlifescienceai/medmcqa", None),
              "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled"), "gsm8k": ("openai/gsm8k", "main")}


def load_hf_rows(name, split="train"):
    """Rows in the local-file schema, from the Hugging Face hub."""
    repo, config = HF_SOURCES[name]
    try:
        from datasets import load_dataset
        hub_rows = list(load_dataset(repo, config, split=split))
    except Exception as e:  # offline, or the hub moved: say how to run from a local file instead
        raise SystemExit(f"could not load {repo} from the Hugging Face hub ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); point train_data / eval_data (eval.py --data) at a "
                         f"local jsonl")
    rows = []
    for r in hub_rows:
        if name == "medmcqa":
            r = {"question": r["question"], "options": dict(zip("ABCD", (r["opa"], r["opb"], r["opc"], r["opd"]))),
                 "answer_idx": "ABCD"[r["cop"]]}
        elif name == "pubmedqa":
            r = {"question": "\n".join(r["context"]["contexts"]) + "\n" + r["question"],
                 "options": {"A": "yes", "B": "no", "C": "maybe"},
                 "answer_idx": {"yes": "A", "no": "B", "maybe": "C"}[r["final_decision"]]}
        rows.append(dict(r))
    return rows


def load_task(name, path=None, n=None, seed=0, shuffle_options=False, split="train", **synth_kw):
    """-> list of examples {"task", "id", "prompt", "answer", ...}.
    path: a local jsonl (raw schema, or rows that already have prompt/answer); None -> HF hub (or generated, addition).
    n: a seeded random subset of n rows, kept in file order. shuffle_options: False, True, or a letter to pin
    the correct option there. synth_kw (addition): digits=(lo, hi); split 'train'/'eval' picks the disjoint half."""
    if name == "addition" and path is None:
        return make_addition(n or 1000, seed=seed, split=split, **synth_kw)
    rows = load_jsonl(path) if path is not None else load_hf_rows(name, split)
    idx = list(range(len(rows)))
    if n is not None and n < len(rows):
        idx = sorted(random.Random(seed).sample(idx, n))
    out = []
    for i in idx:
        r = rows[i]
        if "prompt" in r and "answer" in r:  # already uniform (e.g. written by `tasks.py synth --format prompt`)
            ex = {"task": name, "id": i, **r}
        elif name in MCQ_TASKS:
            ex = mcq_example(r, name, i, shuffle_options, seed)
        elif name == "gsm8k":
            ex = gsm8k_example(r, i)
        else:
            raise ValueError(f"unknown task {name!r} (one of {TASKS})")
        out.append(ex)
    return out


def example_text(ex):
    """Pretraining/SFT text: prompt + ' ' + answer (GSM8K: the worked solution, which ends '#### n')."""
    return ex["prompt"] + " " + ex.get("solution", ex["answer"])


# ----------------------------------------------------------------------------- answer extraction

def cut_at_stop(text, stops=STOP_STRINGS):
    cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
    return text[:cut]


# Words after a bare letter that still make it an answer ("B is correct", "B or C"); any other lowercase word
# after "A" means the article ("A 45-year-old man", "A patient").
_FOLLOW = r"(?:is|was|would|seems|should|because|since|or|and|then)\b"
_CUE = re.compile(r"\b(?:answer|option|choice)s?\b(?:\s*(?:is|was|would\s+be|should\s+be|:|=|-))*\s*"
                  r"(?:option|choice|letter)?\s*[(\[]?\s*([A-Za-z])(?![\w'’])", re.I)
_TOKEN = re.compile(r"(?<![\w'’])([A-Za-z])(?![\w'’])")


def extract_letter(text, valid="ABCD"):
    """The answer letter in `text`, or None. Rule, in order:
    1. the first explicit cue: 'answer is C', 'Answer: D) foo', 'answer is (b)', 'option B', 'choice: C';
       a lowercase letter after a cue counts only when not followed by a word ('the answer is a drug' -> no);
    2. else the first standalone letter that looks like an answer:
       - '(B)' / '[b]' anywhere, any case; 'b)' anywhere;
       - at the start (after spaces/markdown): 'B', 'B.', 'B) foo', 'B Tell the attending...', lowercase 'b.'/'b)'/'b:';
         except 'A' followed by a lowercase or numeric word, which is the article ('A 45-year-old man');
       - elsewhere an uppercase letter followed by '.', ')', ':', ',', end of text, or 'is/or/and/...' ('I think B').
    So multiple letters ('B or C') give the first; letters outside `valid` are ignored."""
    for m in _CUE.finditer(text):
        L = m.group(1)
        if L.upper() in valid and (L.isupper() or re.match(r"\s*(?:$|[.,;:)\]])", text[m.end():])):
            return L.upper()
    body = text.lstrip(" \t\n*_\"'`>#")
    start = len(text) - len(body)
    for m in _TOKEN.finditer(text):
        L, i, j = m.group(1), m.start(), m.end()
        if L.upper() not in valid:
            continue
        after, before = text[j:], text[:i]
        if (before.endswith(("(", "[")) and after.startswith((")", "]"))) or (L.islower() and after.startswith(")")):
            return L.upper()
        if i == start:
            if L.islower():
                if after[:1] in (".", ")", ":"):
                    return L.upper()
                continue
            if L == "A" and re.match(r"\s+[a-z0-9]", after) and not re.match(r"\s+" + _FOLLOW, after):
                continue  # the article
            return L
        if L.isupper() and (re.match(r"\s*(?:$|[.):,;])", after) or re.match(r"\s+" + _FOLLOW, after)):
            return L
    return None


def extract_yesno(text):
    """'yes'/'no'/'maybe' or None: the leading word if it is one; else after a cue ('answer is no');
    else the first of the three words anywhere (so prose 'no difference' reads as 'no')."""
    t = text.lower()
    m = (re.match(r"[\s\W]*(yes|no|maybe)\b", t) or re.search(r"\banswer\b\s*(?:is|:)?\s*(yes|no|maybe)\b", t)
         or re.search(r"\b(yes|no|maybe)\b", t))
    return m.group(1) if m else None


def extract_choice(text, options):
    """Letter among `options` (dict letter -> text). Yes/no/maybe options: a leading yes/no/maybe word wins,
    then a letter, then yes/no/maybe anywhere. Others: a letter, else a first line equal to an option's text."""
    valid = "".join(options)
    by_text = {str(v).strip().lower().rstrip("."): k for k, v in options.items()}
    if set(by_text) <= {"yes", "no", "maybe"}:
        m = re.match(r"[\s\W]*(yes|no|maybe)\b", text.lower())
        if m and m.group(1) in by_text:
            return by_text[m.group(1)]
        L = extract_letter(text, valid)
        return L if L else by_text.get(extract_yesno(text))
    L = extract_letter(text, valid)
    if L is None:
        line = text.strip().split("\n")[0].strip().lower().rstrip(".")
        L = by_text.get(line)
    return L


_NUM = re.compile(r"(?<![\w)])(-\s?)?\$?\s?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def normalize_number(s):
    """'$1,000.50' -> '1000.5', '10.0' -> '10', '-3' -> '-3', '7.' -> '7'; None if not a number."""
    s = str(s).strip().replace("−", "-").replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _numbers(text):
    return [normalize_number((m.group(1) or "").replace(" ", "") + m.group(2))
            for m in _NUM.finditer(text.replace("−", "-"))]


def extract_number(text, strict=False):
    """GSM8K answer: the first number after the first '####'. Without one (or nothing after it) the LAST number
    in the text, unless strict. Normalised by normalize_number; None if no number."""
    if "####" in text:
        nums = _numbers(text.split("####", 1)[1])
        if nums:
            return nums[0]
    if strict:
        return None
    nums = _numbers(text)
    return nums[-1] if nums else None


def extract_first_number(text):
    """Addition answer: the first number of the completion (' 4690\\nQ: ...' -> '4690')."""
    nums = _numbers(text)
    return nums[0] if nums else None


def numbers_equal(a, b):
    try:
        return Decimal(str(a)) == Decimal(str(b))
    except InvalidOperation:
        return str(a) == str(b)


# ----------------------------------------------------------------------------- rewards

def extract_answer(task, completion, example):
    """Normalised prediction (letter / number string) from a completion (text after the prompt), or None."""
    task = task or example["task"]
    text = cut_at_stop(completion)
    if task in MCQ_TASKS:
        return extract_choice(text, example["options"])
    if task == "gsm8k":
        return extract_number(text)
    if task == "addition":
        return extract_first_number(text)
    raise ValueError(f"unknown task {task!r}")


def grade(task, completion, example):
    """(reward, parsable) from one extraction: reward 1.0 if the completion's answer matches example['answer']
    (numbers compared numerically), else 0.0; parsable: an answer was found at all."""
    return grade_answer(task, extract_answer(task, completion, example), example)


def grade_answer(task, pred, example):
    """grade() of an answer already extracted (None: none found)."""
    if pred is None:
        return 0.0, False
    if (task or example["task"]) in MCQ_TASKS:
        return float(pred == example["answer"]), True
    return float(numbers_equal(pred, example["answer"])), True


def has_runaway_repetition(seq, **rule):
    """True for degenerate loops: a unit of <= max_period tokens repeated back-to-back >= min_repeats times over
    >= min_span tokens ('B B B ...', 'The answer is B. The answer is B. ...'), or a long n-gram (ngram tokens)
    occurring >= max_ngram_count times (a looping paragraph). seq: token ids, or text (split into words and
    punctuation marks). Defaults flag ~4 of GSM8K's 7,473 reference solutions (e.g. '1*2*2*2*2*2*2*2*2*2*2*2*2')."""
    if isinstance(seq, str):
        words = re.findall(r"\w+|[^\w\s]", seq)
        ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
        seq = [ids[w] for w in words]
    return bool(runaway_repetition_rows([seq], **rule)[0])


def runaway_repetition_rows(rows, max_period=32, min_repeats=3, min_span=12, ngram=16, max_ngram_count=3):
    """has_runaway_repetition of many rows of token ids (>= 0) at once -> bool array: numpy passes over a GRPO step's
    samples (a call per sample was a large part of grpo.score()). Repeated units: eq[i, d] = (a[i + d] == a[i]) for d
    up to max_period, whose run of True ending at i is how far a unit of d tokens has repeated. Repeated n-grams: a
    64-bit hash of every window, sorted per row; rows where one hash comes max_ngram_count times are checked exactly."""
    n = np.array([len(r) for r in rows], dtype=np.int64)
    L = int(n.max(initial=0))
    out = np.zeros(len(rows), dtype=bool)
    if L == 0:
        return out
    a = -1 - np.tile(np.arange(L), (len(rows), 1))  # padding: a different negative number per column, equal to nothing
    for r, ids in enumerate(rows):
        a[r, :len(ids)] = ids
    periods = min(max_period, L // min_repeats)
    if periods:  # a unit of p tokens repeated over run + p tokens; p up to each row's n // min_repeats
        x = np.ascontiguousarray(a.T)  # (L, R): positions first, so each step of the run loop is one contiguous slice
        i, d = np.arange(L), np.arange(1, periods + 1)
        later, inside = np.minimum(i[:, None] + d, L - 1), (i[:, None] + d < L)[:, :, None]  # (L, periods)
        p = d[:, None]
        per = max(1, (1 << 22) // (periods * L))  # rows at a time: ~4M elements per array
        for r0 in range(0, len(rows), per):
            rs = slice(r0, r0 + per)
            run = ((x[later, rs] == x[:, None, rs]) & inside).astype(np.int32)  # (L, periods, rows)
            for j in range(1, L):  # length of the run of True ending at j, position by position
                run[j] *= run[j - 1] + 1
            hit = (run.max(0) + p >= np.maximum(p * min_repeats, min_span)) & (p <= n[rs] // min_repeats)
            out[rs] |= hit.any(0)
    if ngram and L >= ngram:  # a window of ngram tokens occurring max_ngram_count times or more
        W = L - ngram + 1
        h = np.zeros((len(rows), W), dtype=np.uint64)
        with np.errstate(over="ignore"):  # the hash wraps around 2**64 on purpose
            for k in range(ngram):
                h = h * np.uint64(1000003) + a[:, k:k + W].astype(np.uint64)
        past_end = np.uint64(2**64 - 1) - np.arange(W, dtype=np.uint64)  # windows past a row's end: all different
        h = np.where(np.arange(W) <= (n - ngram)[:, None], h, past_end)
        s = np.sort(h, axis=1)
        c = max(max_ngram_count - 1, 0)
        # rows where some hash occurs max_ngram_count times
        maybe = ~out & (s[:, c:] == s[:, :W - c]).any(1) if c < W else np.zeros_like(out)
        for r in np.flatnonzero(maybe):  # count those rows' windows exactly: a hash collision flags nothing
            ids = list(rows[r])
            windows = Counter(tuple(ids[j:j + ngram]) for j in range(len(ids) - ngram + 1))
            out[r] = max(windows.values(), default=0) >= max_ngram_count
    return out


# ----------------------------------------------------------------------------- statistics

def wilson_interval(k, n, z=1.96):
    """Wilson score interval for k successes out of n; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def summarize(correct, parsable=None, z=1.96):
    """Eval summary from per-example 0/1 rewards (and optional parsable flags)."""
    n, k = len(correct), int(sum(c > 0 for c in correct))
    lo, hi = wilson_interval(k, n, z)
    out = {"n": n, "correct": k, "acc": k / n if n else 0.0, "ci_lo": lo, "ci_hi": hi}
    if parsable is not None:
        out["unparsable"] = 1 - sum(map(bool, parsable)) / n if n else 0.0
    return out


# ----------------------------------------------------------------------------- CLI

def _digits(s):
    lo, _, hi = s.partition("-")
    return int(lo), int(hi or lo)


def main(argv=None):
    ap = argparse.ArgumentParser(description="task utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sh = sub.add_parser("show", help="print a few formatted prompts")
    sh.add_argument("task", choices=TASKS)
    sh.add_argument("path", nargs="?")
    sh.add_argument("-n", type=int, default=2)
    sh.add_argument("--shuffle", action="store_true", help="shuffle MCQ options")
    sy = sub.add_parser("synth", help="write {'text'} pretraining rows or {'prompt','answer'} GRPO/eval rows")
    sy.add_argument("--task", default="addition", choices=TASKS)
    sy.add_argument("--path", help="source jsonl for the real tasks")
    sy.add_argument("--n", type=int)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--split", default="train", choices=["train", "eval"], help="addition: disjoint halves")
    sy.add_argument("--digits", type=_digits, default=(1, 4), help="addition operand digits, e.g. 3 or 1-4")
    sy.add_argument("--format", default="text", choices=["text", "prompt"])
    sy.add_argument("--shuffle-options", action="store_true")
    sy.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "show":
        for ex in load_task(a.task, a.path, n=a.n, seed=0, shuffle_options=a.shuffle):
            print(ex["prompt"] + "  [answer: " + ex["answer"] + "]\n" + "-" * 60)
        return
    kw = {"digits": a.digits} if a.task == "addition" else {}
    exs = load_task(a.task, a.path, n=a.n, seed=a.seed, shuffle_options=a.shuffle_options, split=a.split, **kw)
    if a.format == "text":
        rows = [{"text": example_text(e)} for e in exs]
    else:
        rows = [{k: e[k] for k in ("prompt", "answer", "options", "answer_text", "question") if k in e} for e in exs]
    write_jsonl(a.out, rows)
    print(f"wrote {len(rows)} rows to {a.out}")


if __name__ == "__main__":
    main()

"""prepare_data.py and tokenizer.py on small generated sources (plus the shared data folder where present)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SHARED, needs_shared
import prepare_data as P
from tokenizer import get_tokenizer, load_tokenizer

GPT2_FILE = os.path.join(SHARED, "gpt2.tiktoken")
DOCS = ["Hello world.", "Ünïcödé — 日本語 ✓", "a line\nand another\n\n", "literal <|endoftext|> stays text",
        "x"] + [f"document number {i}: " + "word " * (i % 13) for i in range(60)]


@pytest.fixture
def gpt2_env(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_GPT2_FILE", GPT2_FILE)


@pytest.fixture
def bpe_json(tmp_path):
    """A tiny byte-level BPE tokenizer.json (exact round trip, no char prescan), trained on DOCS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "bpe.json"))
    return str(tmp_path / "bpe.json")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_parquet(path, texts, column="text"):
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return str(path)


def run(*argv):
    return P.prepare(P.parse_args([str(a) for a in argv]), quiet=True)


def read_split(out, split):
    """A split's documents (as token arrays) in file order, cut at EOS."""
    meta = json.load(open(os.path.join(out, "meta.json")))
    files = meta["splits"][split]["files"]
    ids = np.concatenate([np.fromfile(os.path.join(out, f), dtype=meta["dtype"]) for f in files])
    assert len(ids) == 0 or ids[-1] == meta["eos_id"], "every document ends with EOS"
    cuts = np.flatnonzero(ids == meta["eos_id"])
    return np.split(ids, cuts + 1)[:-1] if len(ids) else [], meta


def decoded(out, split):
    docs, meta = read_split(out, split)
    tok = load_tokenizer(meta, out)
    return [tok.decode(d[:-1].tolist()) for d in docs]


def roundtrip(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS[:30]])
    src2 = write_parquet(tmp_path / "b.parquet", DOCS[30:])
    out = tmp_path / "out"
    meta = run("--source", src, "--source", src2, "--tokenizer", tokenizer, "--val-fraction", 0.2, "--out", out)
    train, val = decoded(out, "train"), decoded(out, "val")
    assert sorted(train + val) == sorted(DOCS) and len(val) > 0
    assert train == [d for d in DOCS if d in train]  # document order kept
    for split, texts in (("train", train), ("val", val)):
        s = meta["splits"][split]
        assert s["documents"] == len(texts) and s["bytes"] == sum(len(t.encode()) for t in texts)
        assert s["tokens"] == sum(len(d) for d in read_split(out, split)[0])
    return meta


def test_roundtrip_char(tmp_path):
    meta = roundtrip(tmp_path, "char")
    assert meta["chars"] == sorted(set("".join(DOCS))) and meta["vocab_size"] == len(meta["chars"]) + 1
    assert meta["eos_id"] == len(meta["chars"]) and meta["dtype"] == "uint16"


def test_roundtrip_hf_tokenizer_json(tmp_path, bpe_json):
    meta = roundtrip(tmp_path, bpe_json)
    assert meta["eos_id"] == 0 and meta["dtype"] == "uint16" and meta["tokenizer"] == bpe_json


@needs_shared
def test_roundtrip_gpt2(tmp_path, gpt2_env):
    meta = roundtrip(tmp_path, "gpt2")
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    docs, _ = read_split(tmp_path / "out", "train")
    assert sum((d == 50256).sum() for d in docs) == len(docs)  # "<|endoftext|>" in text is ordinary text, not EOS


@needs_shared
def test_gpt2_offline_ids(gpt2_env):
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995] and (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode_batch(["Hello world", "a<|endoftext|>b"]) == [[15496, 995], tok.encode("a<|endoftext|>b")]
    assert 50256 not in tok.encode("a<|endoftext|>b")
    assert [a.tolist() for a in tok.encode_arrays(DOCS)] == tok.encode_batch(DOCS)


def test_gpt2_missing_file_message(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_GPT2_FILE", str(tmp_path / "nope.tiktoken"))
    with pytest.raises(RuntimeError, match="set TIKTOKEN_GPT2_FILE=/path/to/gpt2.tiktoken"):
        get_tokenizer("gpt2")


def test_medqa_and_gsm8k_rows(tmp_path):
    row = {"question": " What is given? ", "options": {"A": "Aspirin", "B": "Heparin "}, "answer_idx": "B",
           "answer": "Heparin"}
    assert P.row_text(row, "text", "x") == "Question: What is given?\nA. Aspirin\nB. Heparin\nAnswer: B"
    gsm = {"question": "2+2?", "answer": "It is 4.\n#### 4"}
    assert P.row_text(gsm, "text", "x") == "Question: 2+2?\nAnswer: It is 4.\n#### 4"
    src, val = write_jsonl(tmp_path / "q.jsonl", [row, row]), write_jsonl(tmp_path / "v.jsonl", [gsm])
    run("--source", src, "--val-source", val, "--tokenizer", "char", "--out", tmp_path / "o")
    assert decoded(tmp_path / "o", "train") == ["Question: What is given?\nA. Aspirin\nB. Heparin\nAnswer: B"] * 2
    assert decoded(tmp_path / "o", "val") == ["Question: 2+2?\nAnswer: It is 4.\n#### 4"]


@needs_shared
def test_real_medqa_rows():
    rows = [json.loads(line) for line in open(os.path.join(SHARED, "medqa", "dev.jsonl"))][:3]
    for r in rows:
        text = P.row_text(r, "text", "x")
        assert text.startswith("Question: ") and text.endswith("\nAnswer: " + r["answer_idx"])
        assert f"\n{r['answer_idx']}. {r['options'][r['answer_idx']].strip()}\n" in text


def test_mixture_fractions_and_meta(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big {i} " + "b" * (i % 50)} for i in range(2000)])
    small = write_parquet(tmp_path / "small.parquet", [f"small {i} " + "s" * (i % 30) for i in range(200)])
    out = tmp_path / "mix"
    meta = run("--source", f"{big}:0.85", "--source", f"{small}:0.15", "--tokenizer", "char", "--max-tokens", 60000,
               "--out", out)
    src = {s["name"].split("/")[-1]: s for s in meta["sources"]}
    train = meta["splits"]["train"]["tokens"]
    assert abs(train - 60000) < 200
    assert abs(src["big.jsonl"]["train_tokens"] / train - 0.85) < 0.005
    assert abs(src["small.parquet"]["train_tokens"] / train - 0.15) < 0.005
    assert src["small.parquet"]["epochs"] > 1 and src["big.jsonl"]["epochs"] is None  # small repeated, big read in part
    assert train == sum(s["train_tokens"] for s in meta["sources"])
    assert meta["splits"]["val"]["tokens"] == sum(s["val_tokens"] for s in meta["sources"])
    for s in meta["sources"]:
        assert {"name", "path", "weight", "train_tokens", "val_tokens", "documents"} <= s.keys()
    assert meta["args"]["max_tokens"] == 60000 and meta["args"]["source"] == [f"{big}:0.85", f"{small}:0.15"]
    texts = decoded(out, "train")
    assert sum(t.startswith("small") for t in texts) > 200  # repeated documents are whole documents
    assert set(texts) <= {json.loads(l)["text"] for l in open(big)} | set(pq.read_table(small)["text"].to_pylist())
    # without --max-tokens: the largest mixture that repeats nothing
    meta = run("--source", f"{big}:0.5", "--source", f"{small}:0.5", "--tokenizer", "char", "--out", tmp_path / "mix2")
    ep = sorted(s["epochs"] for s in meta["sources"])
    assert ep[1] == 1.0 and ep[0] < 1


def test_val_source_and_single_document(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    txt = tmp_path / "one.txt"
    txt.write_text(text)
    run("--source", txt, "--tokenizer", "char", "--val-fraction", 0.1, "--out", tmp_path / "c")
    assert decoded(tmp_path / "c", "train") == [text[:900]] and decoded(tmp_path / "c", "val") == [text[900:]]
    tr, va = write_parquet(tmp_path / "tr.parquet", DOCS[:40]), write_parquet(tmp_path / "va.parquet", DOCS[40:])
    meta = run("--source", tr, "--val-source", va, "--tokenizer", "char", "--out", tmp_path / "v")
    assert decoded(tmp_path / "v", "train") == DOCS[:40] and decoded(tmp_path / "v", "val") == DOCS[40:]
    assert [s["role"] for s in meta["sources"]] == ["train", "val"]


def test_shards_and_determinism(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    run("--source", src, "--tokenizer", "char", "--out", tmp_path / "one")
    meta = run("--source", src, "--tokenizer", "char", "--shard-tokens", 100, "--out", tmp_path / "sh")
    files = meta["splits"]["train"]["files"]
    assert files[:2] == ["train_000.bin", "train_001.bin"] and len(files) > 3
    sizes = [os.path.getsize(tmp_path / "sh" / f) // 2 for f in files]
    assert max(sizes) == 100 and sum(sizes) == meta["splits"]["train"]["tokens"]
    assert decoded(tmp_path / "sh", "train") == decoded(tmp_path / "one", "train")
    assert len(decoded(tmp_path / "one", "val")) == 1  # 65 docs x 0.005: a small source still gives val one document
    run("--source", src, "--tokenizer", "char", "--out", tmp_path / "two")
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def snapshot(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def test_overwrite_protection(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "ds"
    run("--source", src, "--tokenizer", "char", "--shard-tokens", 200, "--out", out)
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"already holds a different dataset \(args differ: shard_tokens, "
                                         r"val_fraction\); pass --overwrite"):
        run("--source", src, "--tokenizer", "char", "--val-fraction", 0.3, "--out", out)
    assert snapshot(out) == before
    run("--source", src, "--tokenizer", "char", "--shard-tokens", 200, "--out", out)
    assert "up to date" in capsys.readouterr().out and snapshot(out) == before
    run("--source", src, "--tokenizer", "char", "--out", out, "--overwrite")
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # old shards gone


def test_failure_midway_writes_nothing(tmp_path, bpe_json):
    good = [{"text": d} for d in DOCS] * 50
    bad = write_jsonl(tmp_path / "bad.jsonl", good)
    with open(bad, "a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:3251: bad JSON"):
        run("--source", bad, "--tokenizer", bpe_json, "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    src = write_jsonl(tmp_path / "a.jsonl", good)
    run("--source", src, "--tokenizer", bpe_json, "--out", tmp_path / "old")
    before = snapshot(tmp_path / "old")
    with pytest.raises(SystemExit, match="bad JSON"):
        run("--source", bad, "--tokenizer", bpe_json, "--out", tmp_path / "old", "--overwrite")
    assert snapshot(tmp_path / "old") == before  # old dataset intact, no temp files left


def test_clear_errors(tmp_path):
    pq_src = write_parquet(tmp_path / "t.parquet", ["a", "b"], column="body")
    (tmp_path / "notes.csv").write_text("a,b\n")
    cases = [(["--source", tmp_path / "missing.parquet"], "source not found: .*missing.parquet"),
             (["--source", tmp_path / "notes.csv"], "unknown file type for .*notes.csv"),
             (["--source", pq_src], "has no column 'text' \\(columns: body, id\\); pick one with --text-column"),
             (["--source", write_jsonl(tmp_path / "w.jsonl", [{"body": "x"}])],
              "no 'text' field .* fields are \\['body'\\]"),
             (["--source", write_jsonl(tmp_path / "n.jsonl", [{"text": "x"}, {"text": 5}])],
              "n.jsonl:2: 'text' must be a string, not int$"),
             (["--source", f"{pq_src}:0.5", "--source", pq_src, "--text-column", "body"],
              "give a positive weight to every train source or to none")]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            run(*argv, "--tokenizer", "char", "--out", tmp_path / "o")
        assert not (tmp_path / "o").exists()
    run("--source", pq_src, "--text-column", "body", "--tokenizer", "char", "--out", tmp_path / "o")  # the fix works
    # from the command line: exit code 1 and one line on stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--source",
                        str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"prepare_data.py: error: source not found: {tmp_path / 'missing.parquet'}"]
    with pytest.raises(SystemExit, match="cannot create --out /dev/null/o: Not a directory$"):
        run("--source", pq_src, "--text-column", "body", "--tokenizer", "char", "--out", "/dev/null/o")


def test_dtype_choice_and_large_vocab(tmp_path):
    assert [P.token_dtype(v) for v in (66, 50257, 65536, 65537, 151936)] == ["uint16"] * 3 + ["uint32"] * 2
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70000)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "w1 w69999 w5"}, {"text": "w69000"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "w7"}])
    meta = run("--source", src, "--val-source", val, "--tokenizer", tmp_path / "tokenizer.json",
               "--out", tmp_path / "o")
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"]) == ("uint32", 70002, 70001)
    docs, _ = read_split(tmp_path / "o", "train")
    assert [d.tolist() for d in docs] == [[2, 70000, 6, 70001], [69001, 70001]]
    assert os.path.exists(tmp_path / "o" / "tokenizer.json")  # the dataset carries its tokenizer
    tk2 = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tk2.add_special_tokens(["<pad>"])
    tk2.save(str(tmp_path / "noeos.json"))
    with pytest.raises(SystemExit, match=r"no end-of-text token .* its special tokens are \['<pad>'\]"):
        run("--source", src, "--tokenizer", tmp_path / "noeos.json", "--out", tmp_path / "o3")


def test_bench_smoke(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    assert P.bench(P.parse_args(["--source", src, "--tokenizer", "char", "--bench"]), rounds=1) > 0
    assert "pipeline / raw encode_batch throughput" in capsys.readouterr().out


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "ds"
    run("--source", src, "--tokenizer", "char", "--out", out)
    dead, live = dead_pid(), os.getppid()
    stale = [f".tmp.{dead}.train.bin", f".tmp.{dead}.src0.bin", f".tmp.{dead}.unseen_authors_001.bin",
             f".tmp.{os.getpid()}.val.raw", ".tmp.val.raw", ".tmp.meta.json"]  # no pid: written by an older version
    kept = [f".tmp.{live}.src0.bin", ".tmp.notes.txt", "notes.txt"]  # a live run's file; files of other tools
    for f in stale + kept:
        (out / f).write_bytes(b"x")
    capsys.readouterr()
    run("--source", src, "--tokenizer", "char", "--out", out)  # up to date: still cleans up
    assert sorted(os.listdir(out)) == sorted(["meta.json", "train.bin", "val.bin"] + kept)
    assert f"removed {len(stale)} temporary file(s) of an interrupted run" in capsys.readouterr().out
    run("--source", src, "--tokenizer", "char", "--out", out, "--val-fraction", 0.3, "--overwrite")
    assert sorted(os.listdir(out)) == sorted(["meta.json", "train.bin", "val.bin"] + kept)
    assert P.tmp(str(out), "train.bin") == str(out / f".tmp.{os.getpid()}.train.bin")  # the pid is in the name


def test_kill_9_midway_then_rerun_leaves_no_temp_files(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "ds"
    argv = ["--source", src, "--tokenizer", "char", "--out", str(out)]
    child = ("import sys, time, prepare_data as P\n"
             "write = P.write_split\n"
             "P.write_split = lambda *a: (write(*a), time.sleep(600))[0]\n"  # hangs with its temp files written
             f"P.main({argv!r})\n")
    p = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if os.path.exists(out / f".tmp.{p.pid}.train.bin") or p.poll() is not None:
                break
            time.sleep(0.1)
        assert p.poll() is None, "the child exited before it could be killed"
    finally:
        p.kill()  # SIGKILL: no except/finally of prepare_data runs
        p.wait()
    left = [f for f in os.listdir(out) if f.startswith(".tmp.")]
    assert f".tmp.{p.pid}.train.bin" in left and f".tmp.{p.pid}.val.raw" in left and "meta.json" not in os.listdir(out)
    run(*argv)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]


def test_non_utf8_input_names_file_and_byte_offset(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("naïve text, ".encode("utf-8") + "café".encode("latin-1") + b" more")
    at = len("naïve text, caf".encode("utf-8"))
    with pytest.raises(SystemExit, match=rf"^prepare_data.py: error: {txt}: not UTF-8 at byte offset {at} "
                                         r"\(b'\\xe9 mo'\); re-encode the file as UTF-8"):
        run("--source", txt, "--tokenizer", "char", "--out", tmp_path / "o")
    good = json.dumps({"text": "fine"}) + "\n"
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(good.encode() * 3 + b'{"text": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=rf"{jl}:4: not UTF-8 at byte offset {3 * len(good) + 13} "):
        run("--source", jl, "--tokenizer", "char", "--out", tmp_path / "o")
    with pytest.raises(SystemExit, match=rf"{jl}:4: not UTF-8 at byte offset {3 * len(good) + 13} "):
        run("--source", write_jsonl(tmp_path / "ok.jsonl", [{"text": d} for d in DOCS]), "--val-source", jl,
            "--tokenizer", "char", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_an_empty_val_split_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    with pytest.raises(SystemExit, match=r"^prepare_data.py: error: --val-fraction 0 leaves the val split empty and "
                                         r"train.py needs one: give --val-fraction > 0 or a --val-source$"):
        run("--source", src, "--tokenizer", "char", "--val-fraction", 0, "--out", tmp_path / "o")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match=f"the val split is empty: --val-source {empty} has no documents$"):
        run("--source", src, "--val-source", empty, "--tokenizer", "char", "--out", tmp_path / "o")
    with pytest.raises(SystemExit, match=r"the val split is empty: too few documents for --val-fraction 0.005; "):
        run("--source", src, "--max-tokens", 5, "--tokenizer", "char", "--out", tmp_path / "o")  # reads 1 document
    assert not (tmp_path / "o").exists()


def authors_parquet(path, authors=40, books=3, big=("Big, Author",)):
    """Many small authors (3 books each) plus big ones (a third of the text each): the shape of real corpora."""
    rows = [(f"Author {a:02d}", f"Book {b} of author {a:02d}. " + "word " * (5 + (a * 7 + b) % 11))
            for a in range(authors) for b in range(books)]
    rows += [(name, f"The big book {b} of {name}. " + "long " * 400) for name in big for b in range(5)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # authors' books interleaved
    pq.write_table(pa.table({"text": [t for _, t in rows], "author": [a for a, _ in rows],
                             "id": list(range(len(rows)))}), path)
    return str(path), rows


def test_holdout_authors_split(tmp_path):
    src, rows = authors_parquet(tmp_path / "books.parquet")
    meta = run("--source", src, "--holdout-authors", 4, "--seed", 3, "--val-fraction", 0.1, "--tokenizer", "char",
               "--out", tmp_path / "h")
    held = meta["splits"]["unseen_authors"]["authors"]
    assert len(held) == 4 and held == sorted(held) and "Big, Author" not in held  # big authors are never picked
    unseen, train, val = (decoded(tmp_path / "h", s) for s in ("unseen_authors", "train", "val"))
    assert unseen == [t for a, t in rows if a in held]  # all their books, in source order
    assert not {t for a, t in rows if a in held} & set(train + val)  # none of their books anywhere else
    assert sorted(train + val) == sorted(t for a, t in rows if a not in held) and len(val) > 0
    s = meta["splits"]["unseen_authors"]
    assert s["files"] == ["unseen_authors.bin"] and s["documents"] == 12
    assert s["bytes"] == sum(len(t.encode()) for t in unseen)
    assert s["tokens"] == sum(len(d) for d in read_split(tmp_path / "h", "unseen_authors")[0])
    assert {"files", "tokens", "bytes"} <= meta["splits"]["val"].keys() and meta["args"]["holdout_authors"] == 4
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(rows) - 12
    # deterministic for a seed, different across seeds
    again = run("--source", src, "--holdout-authors", 4, "--seed", 3, "--val-fraction", 0.1, "--tokenizer", "char",
                "--out", tmp_path / "h2")
    assert again["splits"]["unseen_authors"]["authors"] == held
    assert (tmp_path / "h" / "unseen_authors.bin").read_bytes() == (tmp_path / "h2" / "unseen_authors.bin").read_bytes()
    picks = {tuple(run("--source", src, "--holdout-authors", 4, "--seed", seed, "--tokenizer", "char", "--out",
                       tmp_path / f"s{seed}")["splits"]["unseen_authors"]["authors"]) for seed in range(3)}
    assert len(picks) == 3
    # sharded like the others
    meta = run("--source", src, "--holdout-authors", 4, "--seed", 3, "--shard-tokens", 300, "--tokenizer", "char",
               "--out", tmp_path / "sh")
    assert meta["splits"]["unseen_authors"]["files"][:2] == ["unseen_authors_000.bin", "unseen_authors_001.bin"]
    assert decoded(tmp_path / "sh", "unseen_authors") == unseen


def test_holdout_authors_refusals(tmp_path):
    src, _ = authors_parquet(tmp_path / "books.parquet", authors=5)
    plain = write_parquet(tmp_path / "plain.parquet", DOCS)
    cases = [(["--source", plain], "plain.parquet has no column 'author' \\(columns: text, id\\); --holdout-authors "
                                   "needs one"),
             (["--source", write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])],
              "a.jsonl: the first row has no 'author' field; --holdout-authors needs one"),
             (["--source", src, "--holdout-authors", 6],
              "--holdout-authors 6: only 5 of the 6 authors have at most 3% of the text each"),
             (["--source", src, "--holdout-authors", -1], "--holdout-authors must be >= 0")]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            run(*(["--holdout-authors", 2] + argv), "--tokenizer", "char", "--out", tmp_path / "o")
        assert not (tmp_path / "o").exists()
    meta = run("--source", src, "--tokenizer", "char", "--out", tmp_path / "o")
    assert "holdout_authors" not in meta["args"] and "unseen_authors" not in meta["splits"]  # older datasets match


@needs_shared
def test_holdout_authors_real_gutenberg(tmp_path, gpt2_env):
    src = os.path.join(SHARED, "gutenberg", "train.parquet")
    meta = run("--source", src, "--val-source", os.path.join(SHARED, "gutenberg", "val.parquet"),
               "--holdout-authors", 6, "--out", tmp_path / "g")
    held = meta["splits"]["unseen_authors"]["authors"]
    table = pq.read_table(src, columns=["author", "text"]).to_pylist()
    tok = get_tokenizer("gpt2")
    head = {r["author"]: set() for r in table}  # first 64 tokens of each book, by author
    for r in table:
        head[r["author"]].add(tuple(tok.encode(r["text"][:2000])[:64]))
    held_heads = set().union(*(head[a] for a in held))
    train, unseen = (read_split(tmp_path / "g", s)[0] for s in ("train", "unseen_authors"))
    assert len(unseen) == sum(r["author"] in held for r in table) and len(train) == len(table) - len(unseen)
    assert all(tuple(d[:64].tolist()) in held_heads for d in unseen)
    assert not any(tuple(d[:64].tolist()) in held_heads for d in train)
    share = meta["splits"]["unseen_authors"]["bytes"] / (meta["splits"]["unseen_authors"]["bytes"] +
                                                         meta["splits"]["train"]["bytes"])
    assert 0.02 < share < 0.15

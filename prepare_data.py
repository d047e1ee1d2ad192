"""Tokenize text sources into flat token files for train.py: <out>/train.bin, val.bin and meta.json.

Recommended invocations (offline, first `export TIKTOKEN_GPT2_FILE=path/to/gpt2.tiktoken`):
  Gutenberg books, val.parquet as val, 6 whole authors held out of train as the split unseen_authors:
    python prepare_data.py --source path/to/gutenberg/train.parquet \
        --val-source path/to/gutenberg/val.parquet --holdout-authors 6 --out data/gutenberg
  shakespeare_char (nanoGPT parity; one document, so split 90/10 by characters):
    python prepare_data.py --tokenizer char --source path/to/tinyshakespeare/input.txt \
        --val-fraction 0.1 --out data/shakespeare_char
  85% FineWeb-Edu + 15% medical MCQ text (needs internet for the HF stream):
    python prepare_data.py --hf HuggingFaceFW/fineweb-edu:0.85 --hf-config sample-10BT \
        --source path/to/medmcqa/questions.jsonl:0.15 --max-tokens 2000000000 --out data/fineweb_med
  Speed check (prints pipeline vs raw tiktoken encode_ordinary_batch throughput; writes nothing in --out):
    python prepare_data.py --source path/to/gutenberg/train.parquet --bench

Sources: --source PATH[:weight] (repeatable) is a .parquet file (column --text-column), a .jsonl file
(field --text-column; or MedQA/MedMCQA/PubMedQA rows question/options/answer_idx -> tasks.format_mcq(...) + " X";
or GSM8K rows question/answer -> "Question: q\nAnswer: a"), a .txt file (one document), or a folder of those.
Text files must be UTF-8 (a bad byte stops the run with the file, line and byte offset).
--hf NAME[:weight] streams a HuggingFace dataset instead (the usual route with internet).

Mixture semantics. Without weights every source is used once, whole (--max-tokens then stops reading once
the train split holds that many tokens). With weights (give one for every train source; they are normalised)
a weight is the source's target fraction of the TRAIN split's tokens. The train split has T = --max-tokens
tokens, or, without it, the largest T that needs no repetition (min over sources of tokens_i / weight_i).
Each source then contributes weight_i * T tokens in whole documents: truncated if it has more, repeated
(whole passes, then a prefix) if it has fewer. Sources are interleaved in ~1M-token runs so any stretch of
train.bin, or any shard, has the mixture's proportions. Val documents are drawn per source with probability
--val-fraction (seeded) and never repeated. Realised tokens per source are printed and stored in meta.json.
--holdout-authors N moves every document of N authors (column/field "author" of the train sources, seeded
by --seed) out of train into the split unseen_authors, to measure generalisation to unseen writers.

Output: token ids as uint16 (uint32 if the vocab needs it), every document followed by EOS; with
--shard-tokens N the splits are train_000.bin, train_001.bin, ... of at most N tokens each.
meta.json: tokenizer, vocab_size, eos_id, dtype, chars (char only), splits.{train,val}.{files,tokens,
documents,bytes} (bytes = UTF-8 bytes of the split's text, EOS excluded: tokens/bytes gives bits per byte;
splits.unseen_authors has the same keys plus authors), sources[...], args, inputs. Files are written under
temporary names (.tmp.<pid>.*) and renamed at the end, meta.json last; a killed run's temporary files are
removed by the next run into the same --out. Rerunning with the same arguments (and input file sizes) prints
"up to date" and does nothing (delete --out to force a rebuild); different arguments into an existing dataset
stop with an error unless --overwrite.
"""
import argparse
import glob
import itertools
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from tokenizer import get_tokenizer

EXTS = (".parquet", ".jsonl", ".txt")
CHUNK = 1 << 20  # tokens per interleaved run of a mixture
SPLITS = ("train", "val", "unseen_authors")
AUTHOR = "author"  # the column / field --holdout-authors groups documents by
# held-out authors are picked among those with at most this share of the bytes: one prolific author would make
# the split large and erratic
HOLDOUT_MAX_SHARE = 0.03
# every temp file name a run writes, with its pid (older versions wrote none): what a later run may clean up
TMP_NAME = re.compile(r"\.tmp\.(?:(\d+)\.)?(?:src\d+\.bin|val\.raw|unseen\.raw|meta\.json|tokenizer\.json"
                      r"|(?:train|val|unseen_authors)(?:_\d+)?\.bin)")


def die(msg):
    raise SystemExit(f"prepare_data.py: error: {msg}")


def tmp(out, name):
    """Temp path of a file before its final rename; the pid tells a later run a killed run's files from a live one's."""
    return os.path.join(out, f".tmp.{os.getpid()}.{name}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", default=[], metavar="PATH[:weight]",
                   help="parquet/jsonl/txt file or folder")
    p.add_argument("--hf", metavar="NAME[:weight]", help="HuggingFace dataset streamed with datasets.load_dataset")
    p.add_argument("--hf-config", help="HF dataset config, e.g. sample-10BT")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-max-docs", type=int, help="stop the HF stream after this many documents "
                   "(a weighted mix without --max-tokens reads every source to its end)")
    p.add_argument("--text-column", default="text", help="parquet column / jsonl field holding the text")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 | char | path/to/tokenizer.json")
    p.add_argument("--out", help="output folder, e.g. data/gutenberg")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents drawn into val (> 0 unless --val-source)")
    p.add_argument("--val-source", metavar="PATH", help="use this whole source as the val split instead")
    p.add_argument("--holdout-authors", type=int, default=0, metavar="N",
                   help=f"move all documents of N authors (column '{AUTHOR}', seeded by --seed) out of train into "
                        "the split unseen_authors")
    p.add_argument("--max-tokens", type=int, help="train split token budget")
    p.add_argument("--shard-tokens", type=int, help="write train_000.bin ... of at most this many tokens")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="encoding threads (tokenizers release the GIL)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in --out")
    p.add_argument("--bench", action="store_true", help="measure pipeline vs raw encode_ordinary_batch throughput")
    args = p.parse_args(argv)
    if not args.bench and not args.out:
        p.error("--out is required")
    if not args.source and not args.hf:
        p.error("give at least one --source or --hf")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if args.val_fraction == 0 and not args.val_source and not args.bench:
        die("--val-fraction 0 leaves the val split empty and train.py needs one: "
            "give --val-fraction > 0 or a --val-source")
    if args.holdout_authors < 0:
        die(f"--holdout-authors must be >= 0 (got {args.holdout_authors})")
    if args.holdout_authors and args.hf:
        die(f"--holdout-authors needs local --source files with an '{AUTHOR}' column, not an --hf stream")
    return args


# ----------------------------------------------------------------------------- reading sources

def split_weight(spec):
    """'path:0.15' -> ('path', 0.15); a ':' not followed by a number belongs to the path."""
    head, _, tail = spec.rpartition(":")
    try:
        return (head, float(tail)) if head else (spec, None)
    except ValueError:
        return spec, None


def source_files(path):
    if not os.path.exists(path):
        die(f"source not found: {path}")
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(EXTS))
        if not files:
            die(f"no {'/'.join(EXTS)} files in folder {path}")
        return files
    if not path.endswith(EXTS):
        die(f"unknown file type for {path}: expected {', '.join(EXTS)} or a folder of them")
    return [path]


def row_text(row, column, where):
    """One jsonl row -> document text (plain text field, MCQ with its answer letter, or GSM8K worked solution)."""
    from tasks import format_mcq
    if column in row:
        if not isinstance(row[column], (str, type(None))):  # a number or list would fail deep in the tokenizer
            die(f"{where}: '{column}' must be a string, not {type(row[column]).__name__}")
        return row[column]
    if {"question", "options", "answer_idx"} <= row.keys():
        return format_mcq(row["question"], row["options"]) + " " + str(row["answer_idx"])
    if {"question", "answer"} <= row.keys():
        return f"Question: {row['question']}\nAnswer: {row['answer']}"
    die(f"{where}: no '{column}' field and not a MedQA (question/options/answer_idx) or GSM8K (question/answer) row; "
        f"fields are {sorted(row)}")


def utf8(data, where, offset):
    """Decode bytes read at byte `offset` of a file; a bad byte stops the run with its position, not a traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        die(f"{where}: not UTF-8 at byte offset {offset + e.start} ({data[e.start:e.start + 4]!r}); "
            "re-encode the file as UTF-8, e.g. iconv -f cp1252 -t utf-8")


def file_docs(path, column, author=False):
    """A file's documents; with author=True (text, author) pairs, author None where the file has none."""
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            text = utf8(f.read(), path, 0)
        yield (text, None) if author else text
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            offset = 0
            for i, raw in enumerate(f, 1):
                line = utf8(raw, f"{path}:{i}", offset)
                offset += len(raw)
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        die(f"{path}:{i}: bad JSON ({e})")
                    text = row_text(row, column, f"{path}:{i}")
                    yield (text, row.get(AUTHOR)) if author else text
    else:
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        cols = [column] + ([AUTHOR] if author and AUTHOR in pf.schema_arrow.names else [])
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            texts = batch.column(0).to_pylist()
            if author:
                yield from zip(texts, batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(texts))
            else:
                yield from texts


def hf_docs(src, args, check=False):
    try:
        import datasets
        ds = datasets.load_dataset(src["path"], args.hf_config, split=args.hf_split, streaming=True)
        if check:
            return
        for i, row in enumerate(ds):
            if args.hf_max_docs and i >= args.hf_max_docs:
                break
            yield row_text(row, args.text_column, f"{src['path']} row {i}")
    except (SystemExit, GeneratorExit):
        raise
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        die(f"could not stream HF dataset {src['path']} (no network? pip install datasets?): {why}")


def docs(src, args):
    """Every non-empty document of a source, in a fixed order (only / none of the held-out authors' if so marked)."""
    if src["hf"]:
        return (d for d in hf_docs(src, args) if d)
    keep, drop = src.get("keep"), src.get("drop")
    if keep is None and drop is None:
        return (d for f in src["files"] for d in file_docs(f, args.text_column) if d)
    pairs = ((d, a) for f in src["files"] for d, a in file_docs(f, args.text_column, author=True))
    return (d for d, a in pairs if d and (a in keep if keep is not None else a not in drop))


def check_source(src, args):
    """Fail before anything is written: unreadable files, missing text column, unknown jsonl schema, no HF access."""
    if src["hf"]:
        return list(hf_docs(src, args, check=True))
    for f in src["files"]:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq
            try:
                names = pq.ParquetFile(f).schema_arrow.names
            except Exception as e:
                die(f"cannot read parquet {f}: {e}")
            if args.text_column not in names:
                die(f"{f} has no column '{args.text_column}' (columns: {', '.join(names)}); "
                    "pick one with --text-column")
            if args.holdout_authors and src["role"] == "train" and AUTHOR not in names:
                die(f"{f} has no column '{AUTHOR}' (columns: {', '.join(names)}); --holdout-authors needs one")
        elif f.endswith(".jsonl"):
            row = next(file_docs(f, args.text_column, author=True), None)  # the first row shows the schema
            if args.holdout_authors and src["role"] == "train" and row and row[1] is None:
                die(f"{f}: the first row has no '{AUTHOR}' field; --holdout-authors needs one")
        elif args.holdout_authors and src["role"] == "train":
            die(f"{f} is a .txt file without authors; --holdout-authors needs parquet/jsonl with an '{AUTHOR}' column")


def pick_authors(sources, args):
    """--holdout-authors: {author: (documents, bytes)} of the seeded pick, and the train sources' total bytes."""
    sizes, total = {}, 0
    for s in sources:
        for f in s["files"]:
            for text, author in file_docs(f, args.text_column, author=True):
                n = len(text.encode("utf-8")) if text else 0
                total += n
                if author is not None and n:
                    d, b = sizes.get(author, (0, 0))
                    sizes[author] = (d + 1, b + n)
    eligible = sorted(a for a, (_, b) in sizes.items() if b <= HOLDOUT_MAX_SHARE * total)
    if len(eligible) < args.holdout_authors:
        die(f"--holdout-authors {args.holdout_authors}: only {len(eligible)} of the {len(sizes)} authors have at most "
            f"{HOLDOUT_MAX_SHARE:.0%} of the text each")
    picked = sorted(random.Random(args.seed).sample(eligible, args.holdout_authors))
    return {a: sizes[a] for a in picked}, total


def text_bytes_estimate(src, column):
    """Rough UTF-8 size of a source's text, only for the progress bar's ETA."""
    if src["hf"]:
        return None
    if src.get("keep") is not None:  # the held-out documents are already in their train source's estimate
        return 0
    import pyarrow.parquet as pq
    n = 0
    for f in src["files"]:
        if f.endswith(".parquet"):
            md = pq.ParquetFile(f).metadata
            i = md.schema.to_arrow_schema().get_field_index(column)
            n += sum(md.row_group(g).column(i).total_uncompressed_size for g in range(md.num_row_groups))
        else:
            n += os.path.getsize(f)
    return n


def make_sources(args):
    specs = [(p, w, False) for p, w in map(split_weight, args.source)]
    if args.hf:
        specs.append((*split_weight(args.hf), True))
    if args.val_source:
        specs.append((args.val_source, None, False))
    sources = []
    for i, (path, weight, hf) in enumerate(specs):
        is_val = bool(args.val_source) and i == len(specs) - 1
        name = path if hf else "/".join(os.path.normpath(path).split(os.sep)[-2:])
        sources.append(dict(name=name, path=path, weight=weight, hf=hf, role="val" if is_val else "train",
                            files=[] if hf else source_files(path)))
    weights = [s["weight"] for s in sources if s["role"] == "train"]
    if any(w is not None for w in weights) and (None in weights or min(weights) <= 0):
        die(f"give a positive weight to every train source or to none (got {weights})")
    for s in sources:
        check_source(s, args)
    if args.holdout_authors:  # each train source is read twice: without the held-out authors, then only them
        train = [s for s in sources if s["role"] == "train"]
        held, total = pick_authors(train, args)
        for s in train:
            s["drop"] = set(held)
            sources.append(dict(s, name=s["name"] + " [unseen authors]", weight=None, role="unseen", drop=None,
                                keep=set(held), held=held, total_bytes=total))
    return sources


# ----------------------------------------------------------------------------- tokenizing

def groups(items, nbytes=1 << 20):
    """Bundle documents into ~1 MB tasks: big enough to amortise the thread hand-off, small enough to balance."""
    g, n = [], 0
    for d in items:
        g.append(d)
        n += len(d)
        if n >= nbytes:
            yield g
            g, n = [], 0
    if g:
        yield g


def encode_stream(tok, texts, threads):
    """(text, ids) in input order; groups are encoded on a thread pool while this thread reads ahead (bounded)."""
    ex, q = ThreadPoolExecutor(threads), deque()
    try:
        for g in groups(texts):
            q.append((g, ex.submit(tok.encode_arrays, g)))
            if len(q) > 2 * threads:
                g0, f = q.popleft()
                yield from zip(g0, f.result())
        while q:
            g0, f = q.popleft()
            yield from zip(g0, f.result())
    finally:
        ex.shutdown(cancel_futures=True)


def tokenize_source(i, src, tok, args, dtype, out, side_f, cap, bar):
    """Pass 1: a source's train documents -> its own temp file; its val (or held-out) documents -> side_f."""
    it = docs(src, args)
    first = list(itertools.islice(it, 2))
    vf = 1.0 if src["role"] in ("val", "unseen") else 0.0 if args.val_source else args.val_fraction
    rng = np.random.default_rng([args.seed, i])
    if len(first) == 1 and 0 < vf < 1:  # one document (tinyshakespeare): split it by characters, nanoGPT style
        cut = int(len(first[0]) * (1 - vf))
        print(f"note: {src['name']} is a single document: first {1 - vf:.1%} of its characters -> train, rest -> val")
        texts, draw = iter([first[0][:cut], first[0][cut:]]), iter([False, True]).__next__
    else:
        texts, draw = itertools.chain(first, it), lambda: rng.random() < vf
    eos = np.array([tok.eos_id], dtype=dtype)
    st = dict(lens=[], bytes=[], documents=0, val_tokens=0, val_documents=0, val_bytes=0, complete=cap != 0,
              tmp=tmp(out, f"src{i}.bin"))
    train_tokens, buf = 0, []
    with open(st["tmp"], "wb") as f:
        for text, ids in encode_stream(tok, texts, args.threads) if cap != 0 else ():
            nbytes, n = len(text.encode("utf-8")), len(ids) + 1
            st["documents"] += 1
            if draw():
                np.concatenate([ids.astype(dtype), eos]).tofile(side_f)
                st["val_tokens"] += n
                st["val_documents"] += 1
                st["val_bytes"] += nbytes
            else:
                buf += [ids.astype(dtype), eos]
                last = ids
                st["lens"].append(n)
                st["bytes"].append(nbytes)
                train_tokens += n
                if len(buf) > 4096:
                    np.concatenate(buf).tofile(f)
                    buf = []
            bar.update(n)
            bar.seen += nbytes
            if bar.est and st["documents"] % 64 == 1:  # ETA: all the text at the tokens-per-byte seen so far
                bar.total = int(min(bar.n * bar.est / bar.seen, bar.cap))
            if cap is not None and train_tokens >= cap:
                st["complete"] = False  # the rest of the source was never read
                break
        if buf:
            np.concatenate(buf).tofile(f)
        if 0 < vf < 1 and st["val_documents"] == 0 and len(st["lens"]) > 1:  # a small source still gives val one doc
            n, size = st["lens"].pop(), np.dtype(dtype).itemsize
            f.truncate(f.seek(-n * size, os.SEEK_END))
            np.concatenate([last.astype(dtype), eos]).tofile(side_f)
            st["val_tokens"], st["val_documents"], st["val_bytes"] = n, 1, st["bytes"].pop()
    st["lens"], st["bytes"] = np.array(st["lens"], dtype=np.int64), np.array(st["bytes"], dtype=np.int64)
    return st


# ----------------------------------------------------------------------------- mixing and writing

def doc_runs(ends, stop):
    """(start, end) token ranges covering [0, stop) in ~CHUNK runs cut at document ends."""
    cuts = ends[np.searchsorted(ends, np.arange(CHUNK, stop, CHUNK))]
    b = np.unique(np.concatenate([[0], cuts, [stop]]).astype(np.int64)).tolist()
    return list(zip(b[:-1], b[1:]))


def take(st, target):
    """Whole passes over a source's train documents, then the documents whose midpoint fits the remainder."""
    ends = np.cumsum(st["lens"])
    total = int(ends[-1]) if len(ends) else 0
    if total == 0 or target == 0:
        return [], 0, 0, 0
    reps, rest = divmod(target, total)
    k = int(np.searchsorted(ends - st["lens"] / 2, rest, side="right"))
    stop = int(ends[k - 1]) if k else 0
    runs = doc_runs(ends, total) * reps + (doc_runs(ends, stop) if stop else [])
    return runs, reps * total + stop, reps * len(ends) + k, int(reps * st["bytes"].sum() + st["bytes"][:k].sum())


def interleave(runs):
    """Next run always from the source furthest behind its own total: every stretch of the output is a fair mix."""
    totals = [max(1, sum(e - s for s, e in r)) for r in runs]
    pos, done = [0] * len(runs), [0] * len(runs)
    while True:
        live = [i for i in range(len(runs)) if pos[i] < len(runs[i])]
        if not live:
            return
        i = min(live, key=lambda i: done[i] / totals[i])
        s, e = runs[i][pos[i]]
        pos[i] += 1
        done[i] += e - s
        yield i, s, e


def tokens_of(path, dtype):
    # np.memmap refuses an empty file
    return np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)


def write_split(out, split, chunks, dtype, shard_tokens):
    """Token arrays -> <split>.bin, or <split>_000.bin ... of at most shard_tokens each (temp names); returns names."""
    names, f, size = [], None, np.dtype(dtype).itemsize
    try:
        for a in chunks:
            while len(a):
                if f is None or (shard_tokens and f.tell() >= shard_tokens * size):
                    if f:
                        f.close()
                    names.append(f"{split}_{len(names):03d}.bin" if shard_tokens else f"{split}.bin")
                    f = open(tmp(out, names[-1]), "wb")
                n = shard_tokens - f.tell() // size if shard_tokens else len(a)
                np.asarray(a[:n], dtype=dtype).tofile(f)
                a = a[n:]
        if f is None:  # an empty split still gets its (empty) file
            names.append(f"{split}_000.bin" if shard_tokens else f"{split}.bin")
            open(tmp(out, names[-1]), "wb").close()
    finally:
        if f:
            f.close()
    return names


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 1 << 16 else "uint32"  # ids run 0..vocab_size-1


def run_args(args):
    """The arguments that decide the output (not --out, --overwrite, --bench, --threads)."""
    skip = ("out", "overwrite", "bench", "threads")
    # holdout_authors only when used: a dataset made before the option existed stays "up to date"
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip and (k, v) != ("holdout_authors", 0)}


def input_sizes(sources, args):
    files = [f for s in sources for f in s["files"]]
    files += [args.tokenizer] if args.tokenizer not in ("gpt2", "char") else []
    return {f: os.path.getsize(f) for f in files}


def split_files(out):
    return [f for split in SPLITS for f in glob.glob(os.path.join(out, f"{split}*.bin"))]


def clean_stale(out):
    """Remove the temp files of runs that died (kill -9, power cut) in out; a live run's files are left alone."""
    stale = []
    for name in sorted(os.listdir(out)):
        m = TMP_NAME.fullmatch(name)
        if m and not (m[1] and pid_alive(int(m[1]))):
            os.remove(os.path.join(out, name))
            stale.append(name)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted run from {out}: {', '.join(stale)}")
    return stale


def pid_alive(pid):
    if pid == os.getpid():  # this run has written nothing yet: the file is from an earlier run that had our pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def check_out(args, sources):
    """Returns True when --out already holds exactly this dataset; stops when it holds another one."""
    mpath = os.path.join(args.out, "meta.json")
    old = json.load(open(mpath)) if os.path.exists(mpath) else None
    if old and old.get("args") == run_args(args) and old.get("inputs") == input_sizes(sources, args) and all(
            os.path.exists(os.path.join(args.out, f)) for s in old["splits"].values() for f in s["files"]):
        return True
    if (old or split_files(args.out)) and not args.overwrite:
        if old:
            new = run_args(args)
            diff = sorted(k for k in set(new) | set(old.get("args", {})) if new.get(k) != old.get("args", {}).get(k))
            why = f"args differ: {', '.join(diff)}" if diff else "input files changed size"
        else:
            why = ".bin files but no meta.json: an interrupted run?"
        die(f"{args.out} already holds a different dataset ({why}); pass --overwrite to replace it")
    return False


def prepare(args, quiet=False):
    """Build the dataset in args.out; returns its meta dict."""
    sources = make_sources(args)
    try:
        tok = get_tokenizer(args.tokenizer, chars=[] if args.tokenizer == "char" else None)
    except (RuntimeError, ValueError) as e:
        die(str(e))
    if os.path.isdir(args.out):
        clean_stale(args.out)
        if check_out(args, sources):
            print(f"{args.out} is up to date (same arguments and input sizes); nothing to do")
            return json.load(open(os.path.join(args.out, "meta.json")))
    if tok.name == "char":  # the vocabulary is every character the sources use
        tok = get_tokenizer("char", sorted(set().union(*(set(d) for s in sources for d in docs(s, args)))))
    dtype = token_dtype(tok.vocab_size)
    made_dir = not os.path.isdir(args.out)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        die(f"cannot create --out {args.out}: {e.strerror}")
    try:
        meta = build(args, sources, tok, dtype, quiet)
    except BaseException:
        for f in glob.glob(tmp(args.out, "*")):
            os.remove(f)
        if made_dir and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    return meta


def build(args, sources, tok, dtype, quiet):
    out, train = args.out, [s for s in sources if s["role"] == "train"]
    unseen = [s for s in sources if s["role"] == "unseen"]
    weights = None if train[0]["weight"] is None else np.array([s["weight"] for s in train]) / sum(
        s["weight"] for s in train)
    if unseen and not quiet:
        held, total = unseen[0]["held"], unseen[0]["total_bytes"]
        share = sum(b for _, b in held.values()) / max(1, total)
        print(f"holding out {len(held)} authors ({share:.1%} of the train sources' bytes) as unseen_authors:")
        for a, (d, b) in held.items():
            print(f"  {a}: {d} documents, {b / max(1, total):.2%} of the bytes")
    est = [text_bytes_estimate(s, args.text_column) for s in sources]
    bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=quiet, mininterval=0.5)
    bar.est, bar.seen = None if None in est else sum(est), 0
    bar.cap = args.max_tokens / (1 - args.val_fraction) if args.max_tokens and not args.val_source else float("inf")
    stats, t0, budget = [], time.time(), args.max_tokens
    with open(tmp(out, "val.raw"), "wb") as val_f, open(tmp(out, "unseen.raw"), "wb") as unseen_f:
        for i, s in enumerate(sources):
            cap = None
            if s["role"] == "train" and budget is not None:  # stop reading once this source's share is there
                cap = (max(0, budget - sum(int(x["lens"].sum()) for x in stats)) if weights is None
                       else int(np.ceil(weights[i] * budget)))
            side_f = unseen_f if s["role"] == "unseen" else val_f
            stats.append(tokenize_source(i, s, tok, args, dtype, out, side_f, cap, bar))
    bar.total = bar.n
    bar.close()
    tstats = [st for st, s in zip(stats, sources) if s["role"] == "train"]
    natural = [int(st["lens"].sum()) for st in tstats]
    for s, n in zip(train, natural):
        if n == 0 and (weights is not None or len(train) == 1):
            die(f"source {s['name']} has no train documents")
    if weights is None:
        targets = natural
    else:
        total = args.max_tokens or min(n / w for n, w in zip(natural, weights))
        targets = [int(round(w * total)) for w in weights]
    taken = [take(st, t) for st, t in zip(tstats, targets)]
    mms = [tokens_of(st["tmp"], dtype) for st in tstats]
    runs = (mms[i][s:e] for i, s, e in interleave([t[0] for t in taken]))
    files = {"train": write_split(out, "train", runs, dtype, args.shard_tokens)}
    for split, raw in (("val", "val.raw"), ("unseen_authors", "unseen.raw")) if unseen else (("val", "val.raw"),):
        toks = tokens_of(tmp(out, raw), dtype)
        files[split] = write_split(out, split, (toks[i:i + CHUNK] for i in range(0, len(toks), CHUNK)), dtype,
                                   args.shard_tokens)
    del mms, toks  # close the memmaps before the temp files go
    elapsed = time.time() - t0

    def side(roles):  # a split written from tokenize_source's side file, summed over the sources of those roles
        sts = [st for st, s in zip(stats, sources) if s["role"] in roles]
        return dict(tokens=sum(st["val_tokens"] for st in sts), documents=sum(st["val_documents"] for st in sts),
                    bytes=sum(st["val_bytes"] for st in sts))

    splits = {"train": dict(files=files["train"], tokens=sum(t[1] for t in taken), documents=sum(t[2] for t in taken),
                            bytes=sum(t[3] for t in taken)),
              "val": dict(files=files["val"], **side(("train", "val")))}
    if unseen:
        splits["unseen_authors"] = dict(files=files["unseen_authors"], **side(("unseen",)),
                                        authors=sorted(unseen[0]["held"]))
    if splits["val"]["tokens"] == 0:  # train.py cannot read an empty val split
        die(f"the val split is empty: --val-source {args.val_source} has no documents" if args.val_source else
            f"the val split is empty: too few documents for --val-fraction {args.val_fraction}; raise it or give "
            "a --val-source")
    meta_sources, per_train = [], iter(zip(taken, natural))
    for s, st in zip(sources, stats):
        if s["role"] == "unseen":  # in splits.unseen_authors
            continue
        (_, tt, td, _), nat = next(per_train) if s["role"] == "train" else ((None, 0, 0, 0), 0)
        meta_sources.append(dict(name=s["name"], path=s["path"], role=s["role"], weight=s["weight"],
                                 documents=st["documents"], train_tokens=tt, train_documents=td,
                                 val_tokens=st["val_tokens"], val_documents=st["val_documents"],
                                 fraction=round(tt / max(1, splits["train"]["tokens"]), 6),
                                 epochs=round(tt / nat, 4) if nat and st["complete"] else None))
    meta = dict(tokenizer=args.tokenizer, vocab_size=tok.vocab_size, eos_id=tok.eos_id, dtype=dtype)
    if tok.name == "char":
        meta["chars"] = tok.chars
    meta.update(splits=splits, sources=meta_sources, args=run_args(args), inputs=input_sizes(sources, args),
                seconds=round(elapsed, 2))
    names = [f for split in files.values() for f in split]
    if args.tokenizer not in ("gpt2", "char"):  # keep a copy so the dataset carries its tokenizer
        shutil.copyfile(args.tokenizer, tmp(out, "tokenizer.json"))
        names.append("tokenizer.json")
    if not quiet:
        for m in meta_sources:
            epochs = "read in part" if m["epochs"] is None else f"{m['epochs']:g} epochs"
            train = (f"train {m['train_tokens']:>13,d} tok ({m['fraction']:.1%} of train, {epochs}), "
                     if m["role"] == "train" else "")
            print(f"{m['name']:<36s} {m['documents']:>9,d} docs -> {train}val {m['val_tokens']:,d} tok")
        for k, v in splits.items():
            print(f"{k}: {v['tokens']:,d} tokens, {v['documents']:,d} documents, {v['bytes']:,d} bytes "
                  f"-> {', '.join(v['files'])}")
    commit(out, names, meta)
    if not quiet:
        n = sum(v["tokens"] for v in splits.values())
        print(f"wrote {out} in {elapsed:.1f}s ({n / max(elapsed, 1e-9) / 1e6:.2f}M tokens/s)")
    return meta


def commit(out, names, meta):
    """Swap the new files in: old meta.json first goes (a half-done swap reads as 'no dataset'), new meta.json last."""
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))
    for n in names:
        os.replace(tmp(out, n), os.path.join(out, n))
    for f in split_files(out) + [os.path.join(out, "tokenizer.json")]:
        if os.path.exists(f) and os.path.basename(f) not in names:  # leftovers of an older dataset (e.g. more shards)
            os.remove(f)
    for f in glob.glob(tmp(out, "*")):
        os.remove(f)
    with open(tmp(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp(out, "meta.json"), os.path.join(out, "meta.json"))


# ----------------------------------------------------------------------------- benchmark

def _mp_init(name):
    global _mp_tok
    _mp_tok = get_tokenizer(name)


def _mp_encode(texts):
    return sum(len(a) for a in _mp_tok.encode_arrays(texts))


def bench(args, rounds=5):
    """Raw tok.encode_batch (tiktoken's encode_ordinary_batch for gpt2) on documents in memory vs the whole pipeline
    (read from disk, encode, write) on the same documents; plus the two ways to spread encoding over cores, in memory.
    Rounds are interleaved so load from other processes hits all alike; best and median of each are printed."""
    import multiprocessing as mp
    args.val_source, args.overwrite = None, True
    args.val_fraction = args.val_fraction or 0.005  # the pipeline refuses an empty val split
    sources = make_sources(args)
    texts = [d for s in sources for d in docs(s, args)]
    tok = get_tokenizer(args.tokenizer, sorted(set().union(*map(set, texts))) if args.tokenizer == "char" else None)
    n = sum(map(len, tok.encode_batch(texts)))
    print(f"bench: {len(texts):,d} documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB, {n:,d} tokens, "
          f"{args.threads} threads, {os.cpu_count()} cores, {rounds} rounds")

    def pipeline():
        shutil.rmtree(args.out, ignore_errors=True)  # else later rounds are "up to date"
        prepare(args, quiet=True)

    def process_pool():
        with mp.Pool(args.threads, _mp_init, (args.tokenizer,)) as pool:
            return sum(pool.imap(_mp_encode, groups(texts)))

    runs = {"raw encode_batch, in memory": lambda: tok.encode_batch(texts),
            "thread pool (encode_stream), in memory":
                lambda: sum(len(a) for _, a in encode_stream(tok, iter(texts), args.threads)),
            "process pool, in memory": process_pool,
            "prepare_data pipeline, disk to disk": pipeline}
    if args.tokenizer == "char":
        del runs["process pool, in memory"]  # its workers would need the chars
    wall, cpu = {k: [] for k in runs}, {k: 0.0 for k in runs}
    with tempfile.TemporaryDirectory() as d:
        args.out = os.path.join(d, "ds")
        for _ in range(rounds):
            for k, fn in runs.items():
                t, c = time.time(), sum(os.times()[:4])  # CPU seconds of this process and its finished children
                fn()
                wall[k].append(time.time() - t)
                cpu[k] += sum(os.times()[:4]) - c
    for k in runs:
        print(f"{k:<40s} {n / min(wall[k]) / 1e6:6.2f}M tok/s best, "
              f"{n / statistics.median(wall[k]) / 1e6:6.2f}M median, "
              f"{n * rounds / max(cpu[k], 1e-9) / 1e6:6.2f}M tok per CPU-second")
    raw, pipe = wall["raw encode_batch, in memory"], wall["prepare_data pipeline, disk to disk"]
    print(f"pipeline / raw encode_batch throughput: {min(raw) / min(pipe):.2f} best vs best, "
          f"{statistics.median(raw) / statistics.median(pipe):.2f} median vs median")
    return min(raw) / min(pipe)


def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        bench(args)
    else:
        prepare(args)


if __name__ == "__main__":
    main()

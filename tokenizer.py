"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken), character-level, or an HF tokenizer.json.

tok = get_tokenizer("gpt2")  # or ("char", chars=[...]) or ("path/to/tokenizer.json")
tok.name, tok.vocab_size (ids incl. EOS), tok.eos_id
tok.encode(text) -> list[int]        ordinary text: "<|endoftext|>" inside text is NOT parsed as EOS
tok.encode_batch(texts) -> list[list[int]]
tok.encode_arrays(texts) -> list[np.ndarray]  same ids as numpy arrays (what prepare_data.py writes)
tok.decode(ids) -> str

Offline, GPT-2 needs its ranks file: TIKTOKEN_GPT2_FILE=/path/to/gpt2.tiktoken (tiktoken's own format).
"""
import os
from types import SimpleNamespace

import numpy as np

# GPT-2's pre-tokenizer split pattern (tiktoken's r50k_pat_str)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")


def _gpt2_encoding():
    import tiktoken
    path = os.environ.get("TIKTOKEN_GPT2_FILE")
    try:
        if path:  # env var first, so an offline machine never waits on the network
            import tiktoken.load
            ranks = tiktoken.load.load_tiktoken_bpe(path)
            return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise RuntimeError("could not load the GPT-2 tokenizer (no network?): "
                           f"set TIKTOKEN_GPT2_FILE=/path/to/gpt2.tiktoken ({type(e).__name__}: {e})") from None


def gpt2_tokenizer():
    enc = _gpt2_encoding()

    def to_array(text):
        try:  # encode_to_numpy with nothing allowed == encode_ordinary, minus the Python list
            return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except (UnicodeEncodeError, AttributeError):  # lone surrogates (encode_ordinary repairs them); tiktoken < 0.7
            return np.array(enc.encode_ordinary(text), dtype=np.uint32)

    return SimpleNamespace(name="gpt2", vocab_size=enc.n_vocab, eos_id=enc.eot_token,
                           encode=enc.encode_ordinary, encode_batch=enc.encode_ordinary_batch,
                           encode_arrays=lambda texts: [to_array(t) for t in texts], decode=enc.decode)


def char_tokenizer(chars):
    chars = list(chars)
    assert chars == sorted(set(chars)), "chars must be sorted and unique"
    codes = np.array([ord(c) for c in chars], dtype=np.int64)

    def to_array(text):
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(codes, cps)  # vectorised lookup: chars are sorted by code point
        bad = (ids >= len(codes)) | (codes[np.minimum(ids, len(codes) - 1)] != cps)
        if bad.any():
            raise ValueError(f"character {chr(cps[bad][0])!r} is not in the char vocabulary")
        return ids.astype(np.uint32)

    def decode(ids):  # EOS has no character: show it as GPT-2's marker
        return "".join(chars[i] if i < len(chars) else "<|endoftext|>" for i in ids)

    return SimpleNamespace(name="char", vocab_size=len(chars) + 1, eos_id=len(chars), chars=chars,
                           encode=lambda text: to_array(text).tolist(),
                           encode_batch=lambda texts: [to_array(t).tolist() for t in texts],
                           encode_arrays=lambda texts: [to_array(t) for t in texts], decode=decode)


def hf_tokenizer(path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True  # ordinary text: special-token strings in documents stay text
    eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
    if eos is None:
        specials = [t.content for t in tok.get_added_tokens_decoder().values()]
        raise ValueError(f"{path}: no end-of-text token ({' / '.join(EOS_NAMES)}); its special tokens are {specials}")

    def encode_batch(texts):
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    return SimpleNamespace(name=path, vocab_size=tok.get_vocab_size(with_added_tokens=True), eos_id=eos,
                           encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
                           encode_batch=encode_batch,
                           encode_arrays=lambda texts: [np.array(i, dtype=np.uint32) for i in encode_batch(texts)],
                           decode=lambda ids: tok.decode(list(ids), skip_special_tokens=False))


def get_tokenizer(name, chars=None):
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "char":
        assert chars is not None, "the char tokenizer needs its chars (meta.json 'chars')"
        return char_tokenizer(chars)
    if not os.path.isfile(name):
        raise ValueError(f"unknown tokenizer {name!r}: use gpt2, char, or a path to an HF tokenizer.json")
    return hf_tokenizer(name)


def load_tokenizer(meta, data_dir=None):
    """The tokenizer a dataset was written with, from its meta.json dict (data_dir: where its tokenizer.json is)."""
    name = meta["tokenizer"]
    if name not in ("gpt2", "char") and not os.path.isfile(name) and data_dir:
        name = os.path.join(data_dir, "tokenizer.json")  # prepare_data.py keeps a copy beside the .bin files
    tok = get_tokenizer(name, meta.get("chars"))
    assert tok.vocab_size == meta["vocab_size"] and tok.eos_id == meta["eos_id"], "tokenizer does not match meta.json"
    return tok

"""
Export a checkpoint of this project to a transformers folder (Qwen3 layout), readable by
AutoModelForCausalLM.from_pretrained, lm-evaluation-harness and vLLM:

    python export_hf.py --ckpt out/run/ckpt.pt --out hf/run [--dtype bfloat16]

Writes config.json (Qwen3ForCausalLM), model.safetensors, generation_config.json and, for GPT-2
checkpoints, the tokenizer (tokenizer.json + vocab.json + merges.txt, built offline from tiktoken's
ranks: TIKTOKEN_GPT2_FILE=/path/to/gpt2.tiktoken when there is no network). Dense models only:
DSA sparse attention and factorized embeddings have no Qwen3 equivalent and are refused.
tests/test_export.py checks that transformers gives our logits (< 1e-4, fp32) and tiktoken's token ids.
The way back (a Qwen3 folder -> a checkpoint dict) is checkpoint.load_hf_folder.
"""
import argparse
import json
import os
import shutil

import torch

from checkpoint import load_checkpoint, load_model
from model import GPTConfig, hf_config_dict, to_hf_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# covers contractions, digits, runs of spaces/newlines, tabs, accents, CJK, emoji: the places BPE ports break
TOKENIZER_CHECK_TEXT = ("Hello world! It's 2024; we'll see 3.14159 vs 10,000.\n\n  Indented\tline   with    spaces \n"
                        "naïve café — 東京 😀 'quoted' they're I'd  trailing   ")


def refuse_reason(ckpt):
    """Why this checkpoint cannot become a Qwen3 model, or None. Read from the raw dicts, so a config field
    this GPTConfig does not know yet (a DSA option) still gets the clear message, not a TypeError."""
    mc = ckpt["model_config"]
    if mc.get("dsa_top_k", 0) or any("indexer" in k for k in ckpt["model"]):
        return "it uses DSA sparse attention (dsa_top_k > 0 / indexer weights)"
    if mc.get("embed_rank", 0):
        return f"it uses factorized embeddings (embed_rank={mc['embed_rank']})"
    unknown = set(mc) - set(GPTConfig.__dataclass_fields__)
    if unknown:
        return f"its model_config has fields this model.py does not know: {sorted(unknown)}"
    return None


def gpt2_ranks():
    """GPT-2's byte-level BPE as {token bytes: id} (id == tiktoken rank, 0..50255), without EOS."""
    from tokenizer import _gpt2_encoding  # TIKTOKEN_GPT2_FILE first, then tiktoken's download
    enc = _gpt2_encoding()
    return {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}, enc


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py): vocab.json and
    tokenizer.json spell tokens in these characters, e.g. a space is 'Ġ'."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def recover_merges(ranks):
    """The merge list from tiktoken's ranks: each multi-byte token is the merge of the two parts that BPE,
    run with only the lower-ranked merges, leaves it in. Listed in rank order, that is GPT-2's merges.txt."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # apply the lowest-ranked available merge, as BPE does
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts[:-1], parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) is not reachable by lower-ranked merges")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_gpt2_tokenizer(folder, model_max_length, ranks, enc):
    b2u = bytes_to_unicode()
    spell = lambda bs: "".join(b2u[b] for b in bs)
    eos = "<|endoftext|>"
    vocab = {spell(t): i for t, i in ranks.items()}
    vocab[eos] = enc.eot_token
    merges = [f"{spell(a)} {spell(b)}" for a, b in recover_merges(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {  # the layout of the Hub's gpt2/tokenizer.json
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": enc.eot_token, "content": eos, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": merges}}
    write_json(folder, "tokenizer.json", tokenizer_json)
    write_json(folder, "vocab.json", vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    write_json(folder, "tokenizer_config.json", {
        "tokenizer_class": "GPT2TokenizerFast", "bos_token": eos, "eos_token": eos, "unk_token": eos,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length})
    write_json(folder, "special_tokens_map.json", {"bos_token": eos, "eos_token": eos, "unk_token": eos})
    check_tokenizer(folder, enc)


def check_tokenizer(folder, enc):
    """Refuse to leave a tokenizer behind that disagrees with tiktoken (the ids the model was trained on)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("note: the tokenizers package is not installed, so the written tokenizer was not checked against "
              "tiktoken")
        return
    got = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(TOKENIZER_CHECK_TEXT).ids
    want = enc.encode_ordinary(TOKENIZER_CHECK_TEXT)
    if got != want:
        raise SystemExit(f"export_hf: the written tokenizer.json disagrees with tiktoken ({got[:12]} vs {want[:12]}); "
                         "not exporting it")


def write_json(folder, name, obj):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def export(ckpt_path, out, dtype="float32", overwrite=False):
    """Check, then write the folder; a failed write (a full disk) is one line naming the incomplete folder."""
    from safetensors import SafetensorError
    ckpt = load_checkpoint(ckpt_path)
    reason = refuse_reason(ckpt)
    if reason:
        raise SystemExit(f"export_hf: cannot export {ckpt_path}: {reason}. transformers' Qwen3 has no equivalent; "
                         "only dense models with plain embeddings export")
    if dtype not in DTYPES:
        raise SystemExit(f"export_hf: --dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise SystemExit(f"export_hf: {out} exists and is not empty; pass --overwrite or choose another --out")
    tok = ckpt.get("tokenizer") or {}
    gpt2 = None
    if tok.get("tokenizer") == "gpt2":  # before writing anything: offline without TIKTOKEN_GPT2_FILE it stops here
        try:
            gpt2 = gpt2_ranks()
        except RuntimeError as e:
            raise SystemExit(f"export_hf: {e}")
    model = load_model(ckpt)[0]
    try:
        return write_folder(model, tok, ckpt_path, out, dtype, gpt2)
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise SystemExit(f"export_hf: could not write {out} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}); it is incomplete: free space, then --overwrite")


def write_folder(model, tok, ckpt_path, out, dtype, gpt2):
    from safetensors.torch import save_file
    name, cfg = tok.get("tokenizer"), model.cfg
    os.makedirs(out, exist_ok=True)

    sd = to_hf_state_dict(model)
    if cfg.tie_embeddings:  # one tensor on disk; transformers ties lm_head to embed_tokens from tie_word_embeddings
        del sd["lm_head.weight"]
    sd = {k: v.to(DTYPES[dtype]).contiguous().clone() for k, v in sd.items()}  # clone: no two names share storage
    weights = os.path.join(out, "model.safetensors")
    save_file(sd, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; a server running as another user must read it

    eos_id = tok.get("eos_id")
    hf = hf_config_dict(cfg)
    hf.update(rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5 reads this
              torch_dtype=dtype, bos_token_id=eos_id, eos_token_id=eos_id,  # GPT-2 style: EOS also begins text
              use_cache=True, initializer_range=0.02)
    write_json(out, "config.json", hf)
    write_json(out, "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
                                               "do_sample": True, "temperature": 1.0})

    if gpt2:
        write_gpt2_tokenizer(out, cfg.block_size, *gpt2)
        note = "GPT-2 tokenizer (tokenizer.json, vocab.json, merges.txt), checked against tiktoken"
    elif name and os.path.isfile(name):  # an HF tokenizer.json the data was prepared with
        shutil.copyfile(name, os.path.join(out, "tokenizer.json"))
        with open(name, encoding="utf-8") as f:  # EOS by its text, so transformers' tokenizer knows it too
            eos = next((t["content"] for t in json.load(f).get("added_tokens", []) if t["id"] == eos_id), None)
        write_json(out, "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                                                  "bos_token": eos, "model_max_length": cfg.block_size})
        note = f"tokenizer.json copied from {name}"
    elif name == "char":
        note = ("NO tokenizer files: a char-level vocabulary has no transformers tokenizer; ids are positions in "
                "ckpt['tokenizer']['chars']")
    else:
        note = f"NO tokenizer files: tokenizer {name!r} not found; copy its tokenizer.json into {out} by hand"
    n_params = sum(v.numel() for v in sd.values())
    print(f"exported {ckpt_path} -> {out}: Qwen3ForCausalLM, {n_params:,} params in {dtype}, "
          f"tied embeddings {cfg.tie_embeddings}; {note}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py or grpo.py")
    p.add_argument("--out", required=True, help="folder to write (transformers layout)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights on disk; float32 is exact, bfloat16 half the size")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    a = p.parse_args()
    export(a.ckpt, a.out, a.dtype, a.overwrite)

"""export_hf.py and checkpoint.load_hf_folder on the CPU: transformers gives our logits, the GPT-2 tokenizer
gives tiktoken's ids, export -> import is exact, and what cannot be represented is refused with one line."""
import json
import os
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint import load_hf_folder, load_model, save_checkpoint
from conftest import SHARED
from export_hf import export
from model import GPT, make_config

transformers = pytest.importorskip("transformers")
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz .,\n"))
GPT2_FILE = os.path.join(SHARED, "gpt2.tiktoken")


def tiny(vocab=320, **kw):
    torch.manual_seed(0)
    m = GPT(make_config("debug", vocab_size=vocab, rope_theta=1e6, **kw)).eval()
    with torch.no_grad():  # norms away from 1, so the test also checks where they are applied
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    return m


def write_ckpt(path, m, tokenizer=None, model_config=None, state=None):
    tokenizer = tokenizer or {"tokenizer": "char", "vocab_size": len(CHARS) + 1, "eos_id": len(CHARS), "chars": CHARS}
    save_checkpoint(path, {"model_config": model_config or asdict(m.cfg), "model": state or m.state_dict(),
                           "optimizer": None, "step": 7, "tokens_seen": 0, "tokenizer": tokenizer, "kind": "pretrain"})
    return path


def hf_logits(folder, idx):
    h = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(h).__name__ == "Qwen3ForCausalLM" and h.dtype == torch.float32
    with torch.no_grad():
        return h(idx).logits


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_logits_equal_ours_and_import_round_trips(tmp_path, tie):
    m = tiny(tie_embeddings=tie)
    out = export(write_ckpt(tmp_path / "ckpt.pt", m), str(tmp_path / "hf"))
    names = set(load_file(os.path.join(out, "model.safetensors")))
    assert ("lm_head.weight" in names) == (not tie)  # tied: embed_tokens only, tie_word_embeddings says the rest
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["tie_word_embeddings"] == tie
    assert cfg["torch_dtype"] == "float32" and cfg["eos_token_id"] == cfg["bos_token_id"] == len(CHARS)
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == len(CHARS)
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))  # char vocab: no transformers tokenizer

    idx = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        ours = m(idx)
    assert (hf_logits(out, idx) - ours).abs().max().item() < 1e-4

    ckpt = load_hf_folder(out)  # and back
    assert ckpt["model_config"] == asdict(m.cfg) and "tokenizer" not in ckpt and ckpt["kind"] == "hf"
    with torch.no_grad():
        assert torch.equal(load_model(ckpt)[0].eval()(idx), ours)


def test_bfloat16_export(tmp_path):
    m = tiny()
    out = export(write_ckpt(tmp_path / "ckpt.pt", m), str(tmp_path / "hf"), dtype="bfloat16")
    assert {t.dtype for t in load_file(os.path.join(out, "model.safetensors")).values()} == {torch.bfloat16}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    state = load_hf_folder(out)["model"]  # imported as fp32 master weights, equal to ours rounded to bf16
    assert state["wte.weight"].dtype == torch.float32
    assert torch.equal(state["blocks.1.attn.qkv.weight"], m.blocks[1].attn.qkv.weight.detach().bfloat16().float())


def test_refuses_existing_folder_without_overwrite(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", tiny())
    export(ckpt, str(tmp_path / "hf"))
    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        export(ckpt, str(tmp_path / "hf"))
    export(ckpt, str(tmp_path / "hf"), overwrite=True)


def test_refuses_factorized_embeddings_and_dsa(tmp_path):
    m = tiny(embed_rank=16)
    with pytest.raises(SystemExit, match=r"factorized embeddings \(embed_rank=16\).*only dense models"):
        export(write_ckpt(tmp_path / "a.pt", m), str(tmp_path / "a"))
    m = tiny()
    # a DSA checkpoint of a future model.py: a config field and indexer weights this GPTConfig may not know
    dsa_config = {**asdict(m.cfg), "dsa_top_k": 64}
    with pytest.raises(SystemExit, match=r"DSA sparse attention.*only dense models"):
        export(write_ckpt(tmp_path / "b.pt", m, model_config=dsa_config), str(tmp_path / "b"))
    state = {**m.state_dict(), "blocks.0.attn.indexer.wq.weight": torch.zeros(4, 64)}
    with pytest.raises(SystemExit, match=r"DSA sparse attention"):
        export(write_ckpt(tmp_path / "c.pt", m, state=state), str(tmp_path / "c"))
    assert not any(os.path.exists(tmp_path / d) for d in "abc")  # refused before writing anything


@pytest.mark.parametrize("tie", [False, True])
def test_load_hf_folder_reads_a_transformers_saved_qwen3(tmp_path, tie):
    """A folder written by transformers itself (rope_parameters nested, 'dtype', no lm_head when tied)."""
    torch.manual_seed(1)
    hc = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                  max_position_embeddings=128, rope_theta=5e5, rms_norm_eps=1e-5,
                                  tie_word_embeddings=tie, eos_token_id=299)
    h = transformers.Qwen3ForCausalLM(hc).eval()
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(1.0, 0.2)
    h.save_pretrained(tmp_path)
    ckpt = load_hf_folder(str(tmp_path))
    c = ckpt["model_config"]
    assert (c["n_kv_head"], c["head_dim"], c["mlp_hidden"], c["rope_theta"], c["norm_eps"], c["tie_embeddings"]) == (
        1, 32, 160, 5e5, 1e-5, tie)
    idx = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        assert (load_model(ckpt)[0].eval()(idx) - h(idx).logits).abs().max().item() < 1e-4


def test_load_hf_folder_refusals(tmp_path):
    m = tiny()
    out = export(write_ckpt(tmp_path / "ckpt.pt", m), str(tmp_path / "hf"))
    cfg = json.load(open(os.path.join(out, "config.json")))

    def folder(name, config, weights="model.safetensors"):
        d = tmp_path / name
        d.mkdir()
        json.dump(config, open(d / "config.json", "w"))
        if weights == "model.safetensors":
            save_file(load_file(os.path.join(out, "model.safetensors")), str(d / weights))
        else:
            (d / weights).write_bytes(b"pickle")
        return str(d)

    with pytest.raises(SystemExit, match=r"LlamaForCausalLM.*not Qwen3ForCausalLM"):
        load_hf_folder(folder("llama", {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(SystemExit, match="pickled weights"):
        load_hf_folder(folder("pickle", cfg, weights="pytorch_model.bin"))
    with pytest.raises(SystemExit, match=r"attention_bias=True.*no equivalent"):
        load_hf_folder(folder("bias", {**cfg, "attention_bias": True}))
    with pytest.raises(SystemExit, match=r"rope type 'yarn'"):
        load_hf_folder(folder("yarn", {**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6,
                                                                  "factor": 4.0}}))
    with pytest.raises(SystemExit, match=r"sliding-window layers"):
        load_hf_folder(folder("window", {**cfg, "layer_types": ["full_attention", "sliding_attention"]}))
    with pytest.raises(SystemExit, match="weights do not match"):
        load_hf_folder(folder("layers", {**cfg, "num_hidden_layers": 3}))
    with pytest.raises(SystemExit, match="shapes disagree"):
        load_hf_folder(folder("shape", {**cfg, "intermediate_size": 128}))
    with pytest.raises(SystemExit, match="no config.json"):
        load_hf_folder(str(tmp_path))


def test_custom_tokenizer_json_is_copied_and_read_back(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizer import load_tokenizer
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the patient presents with fever and cough"] * 50, trainer)
    path = str(tmp_path / "tok.json")
    tk.save(path)
    entry = {"tokenizer": path, "vocab_size": tk.get_vocab_size(), "eos_id": tk.token_to_id("<|endoftext|>")}
    out = export(write_ckpt(tmp_path / "ckpt.pt", tiny(), entry), str(tmp_path / "hf"))
    back = load_hf_folder(out)["tokenizer"]
    assert back == {**entry, "tokenizer": os.path.join(out, "tokenizer.json")}
    assert load_tokenizer(back).encode("the fever") == load_tokenizer(entry).encode("the fever")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token_id == entry["eos_id"]
            and hf_tok("the fever")["input_ids"] == load_tokenizer(entry).encode("the fever"))


@pytest.mark.skipif(not os.path.isfile(GPT2_FILE),
                    reason=f"{GPT2_FILE} not found: the GPT-2 tokenizer test needs tiktoken's ranks offline")
def test_gpt2_tokenizer_encodes_like_tiktoken(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_GPT2_FILE", GPT2_FILE)
    from tokenizer import get_tokenizer
    tik = get_tokenizer("gpt2")
    m = tiny(vocab=50304)
    out = export(write_ckpt(tmp_path / "ckpt.pt", m, {"tokenizer": "gpt2", "vocab_size": 50257, "eos_id": 50256}),
                 str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == tok.bos_token_id == 50256
    texts = ["Hello world", " leading space,  double  space\n\n\ttab", "It's they're we'll I'd don't 'quoted'",
             "naïve café — 東京 😀 \u200b ©2024", "1234567 3.14159 10,000.00 $5",
             "   \n  trailing whitespace  \n\n   ",
             "def f(x):\n    return x**2  # comment\n", "A" * 300 + " aaaa" * 50]
    books = os.path.join(SHARED, "gutenberg", "val.parquet")
    if os.path.isfile(books):  # a real book, 100k characters of it
        import pyarrow.parquet as pq
        texts.append(pq.read_table(books, columns=["text"]).column("text")[0].as_py()[:100_000])
    for text in texts:
        ids = tik.encode(text)
        assert tok(text)["input_ids"] == ids, text[:60]
        assert tok.decode(ids) == text
    # tokenizer.py reading the exported tokenizer.json agrees too, and the import knows it as "gpt2"
    assert get_tokenizer(os.path.join(out, "tokenizer.json")).encode(texts[3]) == tik.encode(texts[3])
    assert load_hf_folder(out)["tokenizer"] == {"tokenizer": "gpt2", "vocab_size": 50257, "eos_id": 50256}
    idx = torch.tensor([tok("The patient presents with")["input_ids"]])
    with torch.no_grad():
        assert (hf_logits(out, idx) - m(idx)).abs().max().item() < 1e-4

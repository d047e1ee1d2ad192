"""Evaluation (grpo.evaluate_*, eval.py) on the CPU: log-likelihood scoring against a by-hand computation,
generative scoring with extraction and unparsable counts, intervals, and eval.py end to end."""
import json
import os
from dataclasses import asdict

import pytest
import torch

import eval as eval_cli
import grpo
import tasks
from checkpoint import save_checkpoint
from model import GPT, make_config
from tokenizer import load_tokenizer

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

ROWS = [{"question": "Which organ pumps blood?", "options": {"A": "liver", "B": "heart", "C": "lung", "D": "skin"},
         "answer_idx": "B"},
        {"question": "Largest bone?", "options": {"A": "femur", "B": "ulna", "C": "rib", "D": "stapes"},
         "answer_idx": "A"},
        {"question": "Insulin comes from?", "options": {"A": "kidney", "B": "thyroid", "C": "pancreas", "D": "brain"},
         "answer_idx": "C"},
        {"question": "Vitamin C lack causes?",
         "options": {"A": "rickets", "B": "beriberi", "C": "pellagra", "D": "scurvy"}, "answer_idx": "D"},
        {"question": "Normal heart rate (per min)?", "options": {"A": "70", "B": "7", "C": "700", "D": "7000"},
         "answer_idx": "A"}]


def setup_char_model(seed=0):
    exs = [tasks.mcq_example(r, "medqa", i) for i, r in enumerate(ROWS)]
    meta = grpo.char_meta([e["prompt"] + " ABCD" for e in exs] + ["0123456789 the answer is"])
    tok = load_tokenizer(meta)
    torch.manual_seed(seed)
    m = GPT(make_config("debug", vocab_size=meta["vocab_size"])).eval()
    return m, tok, meta, exs


def test_loglik_scoring_is_the_argmax_of_each_letters_log_likelihood():
    m, tok, _, exs = setup_char_model()
    res = grpo.evaluate_loglik(m, tok, exs, batch_size=3)  # batches mix examples of different lengths
    preds = []
    for e in exs:  # by hand: one unpadded forward per option, sum of log p over the continuation " X"
        ctx = tok.encode(e["prompt"])
        scores = {}
        for L in e["options"]:
            cont = tok.encode(" " + L)
            lp = torch.log_softmax(m(torch.tensor([ctx + cont]))[0], -1)
            scores[L] = sum(lp[len(ctx) - 1 + j, cont[j]].item() for j in range(len(cont)))
        preds.append(max(scores, key=scores.get))
    correct = sum(p == e["answer"] for p, e in zip(preds, exs))
    assert res["correct"] == correct and res["n"] == 5 and res["unparsable"] == 0.0
    assert res["predicted"] == {L: preds.count(L) for L in set(preds)}
    lo, hi = tasks.wilson_interval(correct, 5)
    assert (res["ci_lo"], res["ci_hi"]) == (lo, hi)


def test_generate_scoring_extracts_answers_and_counts_unparsable(monkeypatch):
    m, tok, _, exs = setup_char_model()
    replies = {0: " B", 1: " the answer is A", 2: " 0000", 3: " C", 4: " A"}  # right, right, unparsable, wrong, right
    by_prompt = {tuple(tok.encode(e["prompt"])): replies[i] for i, e in enumerate(exs)}

    def fake_generate(prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, **kw):
        assert temperature == 0.0 and eos_id == tok.eos_id  # greedy, stops at EOS
        rows = [tok.encode(by_prompt[tuple(p)]) + [eos_id] for p in prompts]
        width = max(map(len, rows))
        out = torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])
        return out, torch.tensor([len(r) for r in rows])

    monkeypatch.setattr(m, "generate", fake_generate)
    res = grpo.evaluate_generate(m, tok, exs, max_new_tokens=20, batch_size=2)
    assert (res["n"], res["correct"], res["acc"]) == (5, 3, 0.6)
    assert res["unparsable"] == pytest.approx(0.2) and res["predicted"] == {"A": 2, "B": 1, "C": 1}
    assert (res["ci_lo"], res["ci_hi"]) == tasks.wilson_interval(3, 5)


def test_numbers_tasks_are_scored_by_exact_match(monkeypatch):
    m, tok, _, _ = setup_char_model()
    exs = [{"task": "gsm8k", "prompt": "Question: 2+2?\nAnswer:", "answer": "4"},
           {"task": "gsm8k", "prompt": "Question: 3*3?\nAnswer:", "answer": "9"},
           {"task": "addition", "prompt": "Q: 1+2=\nA:", "answer": "3"}]
    tok = load_tokenizer(grpo.char_meta([e["prompt"] for e in exs] + ["0123456789 #.$, the answer is"]))
    replies = [" 2+2 is 4.0 #### 4.0", " the answer is $9.", " 31"]
    it = iter(replies)

    def fake_generate(prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, **kw):
        rows = [tok.encode(next(it)) + [eos_id] for _ in prompts]
        width = max(map(len, rows))
        return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows]), torch.tensor([len(r) for r in rows])

    monkeypatch.setattr(m, "generate", fake_generate)
    res = grpo.evaluate(m, tok, exs, mode="both", max_new_tokens=30, batch_size=1)
    assert list(res) == ["generate"]  # no letters to score: numbers are always generated
    assert res["generate"]["correct"] == 2 and res["generate"]["unparsable"] == 0.0  # '31' != '3'


def save_char_ckpt(path):
    m, tok, meta, _ = setup_char_model()
    save_checkpoint(str(path), {"model_config": asdict(m.cfg), "model": m.state_dict(), "optimizer": None, "step": 7,
                                "tokens_seen": 0, "data_state": None, "rng": None, "config": {}, "tokenizer": meta,
                                "best_val_loss": 1.0, "kind": "pretrain"})
    return str(path)


def test_eval_cli_end_to_end(tmp_path, capsys):
    m, tok, _, _ = setup_char_model()
    data = tmp_path / "mcq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ckpt = save_char_ckpt(tmp_path / "ckpt.pt")  # the same weights as m (same seed)
    out = tmp_path / "res.json"
    eval_cli.main(["--ckpt", str(ckpt), "--task", "medqa", "--data", str(data), "--mode", "both", "--device", "cpu",
                    "--json", str(out), "--max_new_tokens", "4", "--show", "1"])
    printed = capsys.readouterr().out
    assert "loglik: acc" in printed and "generate: acc" in printed and "unparsable" in printed
    saved = json.load(open(out))
    assert saved["n"] == 5 and set(saved["results"]) == {"loglik", "generate"}
    direct = grpo.evaluate_loglik(m, tok, [tasks.mcq_example(r, "medqa", i) for i, r in enumerate(ROWS)])
    assert saved["results"]["loglik"]["correct"] == direct["correct"]
    with pytest.raises(SystemExit, match="no data file"):
        eval_cli.main(["--ckpt", str(ckpt), "--task", "medqa", "--data", str(tmp_path / "missing.jsonl"),
                       "--device", "cpu"])
    for bad in (["--batch", "0"], ["--digits", "5-x"]):  # argparse's error: exit 2, one line after the usage
        with pytest.raises(SystemExit, match="2"):
            eval_cli.main(["--ckpt", str(ckpt), "--task", "addition", "--device", "cpu", *bad])


def test_the_hub_out_of_reach_is_one_line(monkeypatch):
    """No network (or no datasets package): the task's hub repo, why, and the local-file way round it."""
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit, match=r"^could not load openai/gsm8k from the Hugging Face hub \(ConnectionError: "
                                         r"Couldn't reach .*\); point train_data / eval_data \(eval.py --data\) at"):
        tasks.load_hf_rows("gsm8k")


def test_eval_cli_bad_data_is_one_line_with_file_and_line(tmp_path):
    ckpt = save_char_ckpt(tmp_path / "ckpt.pt")
    good = json.dumps(ROWS[0]) + "\n"
    no_options = {k: v for k, v in ROWS[1].items() if k != "options"}
    cases = {"medqa": [(good + "\n" + json.dumps(no_options) + "\n",  # a blank line still counts as a line
                        r"x.jsonl:3: a medqa row needs the fields question, options, answer_idx \(or prompt and "
                        r"answer\); missing options; fields are \['answer_idx', 'question'\]$"),
                       (good + '{"question": "cut off', r"x.jsonl:2: bad JSON \(Unterminated string"),
                       (good + json.dumps({**ROWS[2], "answer_idx": "E"}) + "\n",
                        r"x.jsonl:2: answer_idx 'E' is not one of the options \['A', 'B', 'C', 'D'\]$"),
                       (good + "[1, 2]\n", "x.jsonl:2: a row must be a JSON object, not list$"),
                       ("", r"x.jsonl: no examples \(the file is empty\)$"),
                       ("\n \n", r"x.jsonl: no examples \(the file is empty\)$")],
             "gsm8k": [(json.dumps({"question": "2+2?"}) + "\n", "x.jsonl:1: a gsm8k row needs the fields question, "
                        r"answer \(or prompt and answer\); missing answer")]}
    for task, items in cases.items():
        for text, msg in items:
            (tmp_path / "x.jsonl").write_text(text)
            with pytest.raises(SystemExit, match=msg):
                eval_cli.main(["--ckpt", ckpt, "--task", task, "--data", str(tmp_path / "x.jsonl"), "--device", "cpu"])
    (tmp_path / "x.jsonl").write_bytes(good.encode() + b'{"question": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match="x.jsonl:2: not UTF-8 at byte 17 of the line"):
        eval_cli.main(["--ckpt", ckpt, "--task", "medqa", "--data", str(tmp_path / "x.jsonl"), "--device", "cpu"])
    # uniform prompt/answer rows are fine for every task, as tasks.load_task reads them
    (tmp_path / "x.jsonl").write_text(json.dumps({"prompt": "Question: Largest bone?\nAnswer:", "answer": "3"}) + "\n")
    res = eval_cli.main(["--ckpt", ckpt, "--task", "addition", "--data", str(tmp_path / "x.jsonl"), "--device", "cpu",
                         "--max_new_tokens", "2"])
    assert res["generate"]["n"] == 1


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "gpt2.tiktoken")), reason="shared data absent")
def test_medqa_dev_letters_are_single_gpt2_tokens_after_answer(monkeypatch):
    """As lm-eval medqa_4options: 'Answer:' then ' A'...' D', each one GPT-2 token: loglik = one next-token choice."""
    monkeypatch.setenv("TIKTOKEN_GPT2_FILE", os.path.join(SHARED, "gpt2.tiktoken"))
    tok = load_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257, "eos_id": 50256})
    exs = grpo.load_examples("medqa", os.path.join(SHARED, "medqa", "dev.jsonl"), n=6, split="eval")
    assert all(e["prompt"].endswith("\nAnswer:") and list(e["options"]) == list("ABCD") for e in exs)
    assert [tok.encode(" " + L) for L in "ABCD"] == [[317], [347], [327], [360]]
    torch.manual_seed(0)
    m = GPT(make_config("debug", vocab_size=50304, block_size=1024)).eval()
    res = grpo.evaluate_loglik(m, tok, exs, batch_size=8)
    ctx = [tok.encode(e["prompt"]) for e in exs]
    with torch.no_grad():  # one forward per prompt, argmax over the 4 letter tokens: the same predictions
        preds = ["ABCD"[int(m(torch.tensor([c]))[0, -1, [317, 347, 327, 360]].argmax())] for c in ctx]
    assert res["predicted"] == {L: preds.count(L) for L in set(preds)}
    assert res["correct"] == sum(p == e["answer"] for p, e in zip(preds, exs))

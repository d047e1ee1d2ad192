"""
GRPO fine-tuning on verifiable rewards, from a train.py (or grpo.py) checkpoint. Same configuration style as
train.py: the defaults below, overridden by config files and --key=value.

    python grpo.py config/usmle.py                                     # MedMCQA prompts, MedQA dev evaluation
    python grpo.py config/grpo_debug.py                                # CPU, minutes, from a random char-level model
    python grpo.py config/usmle.py --eval_only=True --init_from=out/usmle/ckpt.pt

One step (DeepSeekMath's GRPO, with DeepSeek-V3.2's unbiased KL and off-policy sequence masking, DAPO's loss sum):
  1. P prompts x G samples from engine.py (batched; an Engine keeps the KV cache; each prompt prefilled once) at
     `temperature` (top-k / top-p optional);
  2. rewards (tasks.py); advantage A_i = (r_i - mean_group) / (std_group + eps), or without the std (Dr. GRPO);
     groups whose rewards are all equal carry no signal and are dropped (frac_zero_std);
  3. old and reference log-probs of the sampled tokens, by the same code and in the same micro-batches as training;
     with one update per batch (fuse_old_logprobs) the old ones are the update forward's own, detached: no pass here.
     A prompt's samples share packed rows (share_prompts): its tokens run once, each completion sees it and itself;
  4. `updates_per_batch` optimizer steps, each on the whole batch with gradients accumulated over micro-batches of
        loss = 1/N sum_{i,t} [ -min(r A_i, clip(r, 1-eps_low, 1+eps_high) A_i) * M_i
                               + kl_coef * r * (q/p - log(q/p) - 1) ]
     r = pi_theta/pi_old per token (not detached), p = pi_theta, q = pi_ref, N = completion tokens of the whole step
     (so micro-batching gives the full-batch gradient), M_i = 0 when A_i < 0 and the sequence's mean
     log(pi_old/pi_theta) > delta (off-policy masking), else 1.
Masks come from positions (prompt and completion lengths), never from token values: EOS may equal the pad.
Non-finite updates are skipped and counted, as in train.py. Functions read the settings below as module globals.
Writes out_dir/ckpt.pt (kind "grpo", the checkpoint format of train.py), log.jsonl, reward_curve.png, tb/.
"""
import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import attention as A
import engine
import model as M
import tasks
from checkpoint import (gpu_faults_in_one_line, load_model, make_out_dir, remove_stale_temps, rng_state, run_logger,
                        save_checkpoint, set_rng_state, setup_device, stop_signals)
from configurator import check_values, configure
from engine import filter_logits
from model import GPT, make_config
from tokenizer import load_tokenizer

# ------------------------------------------------------------------------------------------------
# I/O
init_from = "out/pretrain/ckpt.pt"  # a train.py / grpo.py checkpoint or Qwen3 folder | "resume" | "scratch" (debug)
ref_from = ""  # checkpoint of the frozen KL reference; "" = the starting weights
out_dir = "out/grpo"
eval_only = False  # evaluate the starting checkpoint (eval_* keys), write out_dir/eval.json, exit
# training prompts
task = "medmcqa"  # medqa | medmcqa | pubmedqa | gsm8k | addition
train_data = "../shared/data/medmcqa/questions.jsonl"  # jsonl of the task's schema; "" = generated or the HF hub
train_n = 0  # a seeded subset of this many prompts; 0 = all
addition_digits = (1, 4)  # addition: digits per operand (lo, hi), as `tasks.py synth` writes pretraining text
shuffle_options = True  # MCQ training prompts: shuffle each question's options (stable per question): no letter bias
# held-out evaluation
eval_task = "medqa"
eval_data = "../shared/data/medqa/dev.jsonl"  # "" = generated (addition: its disjoint eval split) or the HF hub
eval_n = 0  # examples (0 = all); taken out of the training prompts when evaluation reads the training file
eval_seed = 0  # which eval_n examples: the same subset eval.py takes by default (--seed 0)
eval_mode = "both"  # MCQ: "loglik" (letters' log-likelihood, as lm-eval medqa_4options) | "generate" | "both"
eval_every = 25  # steps; also before the first step and after the last; 0 = only those two
eval_max_new_tokens = 32
eval_batch = 64
# rollouts
prompts_per_step = 16  # P
samples_per_prompt = 16  # G
max_new_tokens = 64
temperature = 1.0  # sampling and every log-prob in the loss use it: log_softmax(logits / temperature)
top_k = 0  # 0 = off. Untruncated sampling (top_k 0, top_p 1.0): no train/sample support mismatch at all
top_p = 1.0  # 1.0 = off
keep_sampling_mask = True  # with top_k/top_p: log-probs over each step's kept tokens (V3.2); False = full softmax
rollout_batch = 256  # rows per generate() call
keep_decoder = True  # keep the rollouts' KV cache and CUDA graphs between steps: no capture per step, the cache held
cut_at_stop_strings = True  # a completion ends at the first tasks.STOP_STRINGS: reward and loss stop there
# objective
kl_coef = 0.01  # KL to the reference (V3.2's unbiased estimate); 0 = no reference model at all (saves its memory)
eps_low = 0.2  # ratio clipped below at 1 - eps_low
eps_high = 0.2  # ratio clipped above at 1 + eps_high (DAPO's clip-higher: 0.28)
delta = 0.1  # off-policy mask: threshold on a negative-advantage sequence's mean log(pi_old/pi_theta) (V3.2 gives none)
scale_rewards = True  # divide advantages by the group's std (GRPO); False = Dr. GRPO (mean-centred only)
adv_eps = 1e-4  # added to the group std
drop_zero_std = True  # leave out groups whose rewards are all equal (no signal, only KL)
drop_degenerate = False  # leave out samples with no parsable answer or runaway repetition, before the group statistics
updates_per_batch = 1  # mu: optimizer steps on each rollout batch (> 1 makes the ratio and the clipping matter)
micro_batch = 32  # sequences per forward/backward; the loss sums over the step's tokens: any size, the same gradient
logprob_chunk_rows = 4096  # completion tokens whose float32 logits exist at once, never B x T x V
share_prompts = 1024  # a prompt's samples share rows of ~this many tokens (the prompt once); 0 = a row per sample
fuse_old_logprobs = True  # mu 1, untruncated, no dropout: old log-probs = the update's own, detached (a forward fewer)
# optimizer
lr = 1e-5
warmup_steps = 10  # linear warm-up, then constant
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # 0 = off
max_steps = 200
save_every = 50  # steps; and after the last
max_bad_steps = 5  # stop after this many steps in a row with a non-finite loss or grad-norm (updates skipped)
max_failed_saves = 3  # stop after this many failed checkpoint writes in a row
# system
device = "auto"  # "auto" | "cpu" | "cuda"
dtype = "auto"  # autocast dtype: "auto" (bfloat16 on GPU, float32 on CPU) | "bfloat16" | "float32"
attention = "sdpa"  # attention.ATTENTION: "sdpa" | "flash"
residual = "autocast"  # model.RESIDUAL: "autocast" (the residual stream in bf16) | "fp32"
checkpoint_activations = False  # recompute blocks in backward (train passes only): less memory, more compute
compile = False  # torch.compile the log-prob and update forwards, the rollouts' prefill and decoding blocks
seed = 1337
scratch_preset = "debug"  # init_from="scratch": this model preset with a char tokenizer over the tasks' characters
show_samples = 2  # completions printed at each evaluation
# ------------------------------------------------------------------------------------------------


# ---- log-probs of completions ---------------------------------------------------------------------
def pack_rows(prompts, completions, device, pad_id=0, multiple=1, max_len=None, share=0):
    """Samples (prompt, completion) -> a batch for completion_logprobs: seqs (R, T) right-padded rows; clen (S,)
    completion lengths; src, tgt (N,) indexes into seqs.view(-1) of the position predicting each completion token and
    of that token (sample by sample); layout None (causal rows) or (segments, positions) (R, T) for GPT.hidden.
    share=0: row s = prompt s + completion s from position 0, so RoPE positions agree with generate(); T is the
    longest row rounded up to `multiple` (fewer shapes to compile), within max_len.
    share=n: samples with equal prompts share rows of about n tokens: the prompt once, then each completion at the
    positions right after it, seeing only the prompt and itself: G samples cost the prompt's tokens once."""
    groups = {}  # prompt (without sharing: the sample) -> its samples' indexes
    for s, p in enumerate(prompts):
        groups.setdefault(tuple(p) if share else s, []).append(s)
    rows = []  # (prompt, samples in the row): a group over `share` tokens splits into rows of equal sample counts
    for ss in groups.values():
        P = len(prompts[ss[0]])
        n = sum(len(completions[i]) for i in ss)
        k = 1 if not share else min(len(ss), max(1, math.ceil(n / max(share - P, 1))))
        rows += [(prompts[ss[0]], ss[j * len(ss) // k:(j + 1) * len(ss) // k]) for j in range(k)]
    T = max(len(p) + sum(len(completions[i]) for i in r) for p, r in rows)
    T = max(T, min(-(-T // multiple) * multiple, max_len or math.inf))
    seqs, seg, pos = [], [], []  # per row; seg: 0 = prompt, k = the row's k-th completion, -1 = padding
    src, tgt = [None] * len(prompts), [None] * len(prompts)
    for r, (p, samples) in enumerate(rows):
        P = len(p)
        ids, sg, ps = list(p), [0] * P, list(range(P))
        for k, i in enumerate(samples, 1):
            c, o = completions[i], r * T + len(ids)
            tgt[i] = range(o, o + len(c))
            src[i] = [r * T + P - 1, *range(o, o + len(c) - 1)]  # token 0 from the prompt's last position
            ids += c
            sg += [k] * len(c)
            ps += range(P, P + len(c))
        seqs.append(ids + [pad_id] * (T - len(ids)))
        seg.append(sg + [-1] * (T - len(sg)))
        pos.append(ps + [0] * (T - len(ps)))
    seqs, seg, pos = (torch.from_numpy(np.array(x, dtype=np.int64)) for x in (seqs, seg, pos))  # faster than torch
    src, tgt = (torch.from_numpy(np.fromiter((j for x in xs for j in x), dtype=np.int64)) for xs in (src, tgt))
    layout = (seg.to(device), pos.to(device)) if any(len(r) > 1 for _, r in rows) else None
    return {"seqs": seqs.to(device), "layout": layout, "src": src.to(device), "tgt": tgt.to(device),
            "clen": torch.tensor([len(c) for c in completions], device=device)}


def pack_bits(mask):
    """(N, V) bool -> (N, ceil(V/8)) uint8: the kept-token sets of V3.2's Keep Sampling Mask, 8x smaller than bool."""
    pad = (-mask.shape[1]) % 8
    m = F.pad(mask, (0, pad)).view(mask.shape[0], -1, 8).to(torch.uint8)
    return (m << torch.arange(8, device=mask.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits, vocab_size):
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def _chunk_logprobs(model, h, targets, kept_bits, temperature, top_k, top_p, extras):
    """log pi(target) at `temperature` for rows of hidden states; the kept set (sampling truncation) either given as
    bits or, when truncating, rebuilt from these logits (plus the target: it was sampled, so it was kept).
    extras: also the entropy and the kept bits, without grad (under checkpoint, backward does not recompute them)."""
    logits = model.logits(h)
    if temperature != 1.0:  # a pass over the float32 chunk saved at 1
        logits = logits / temperature
    kept = None
    if kept_bits is not None:
        kept = unpack_bits(kept_bits, logits.shape[1])
    elif top_k or top_p < 1.0:
        kept = ~torch.isinf(filter_logits(logits, top_k or None, top_p))
        kept[torch.arange(len(targets), device=kept.device), targets] = True
    if kept is not None:
        logits = logits.masked_fill(~kept, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    if not extras:
        return logp
    with torch.no_grad():
        p = logp_all.exp()
        entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp, entropy, (pack_bits(kept) if kept is not None else None)


@functools.cache
def _compiled_chunk_logprobs():
    """_chunk_logprobs through torch.compile: the cast of the float32 logits, the log-softmax, the gather and the
    entropy fuse into a few passes over each chunk, forward and backward, instead of one per op (BENCHMARKS.md)."""
    return torch.compile(_chunk_logprobs, dynamic=True)


def completion_logprobs(model, batch, temperature=1.0, top_k=0, top_p=1.0, kept_bits=None, extras=False,
                        chunk_rows=4096, compiled=False):
    """Log-probs of each sample's completion tokens, (S, L) with L = max completion length, and the mask (S, L) of real
    completion tokens, for a pack_rows batch. Only completion positions reach the head, `chunk_rows` at a time, each
    chunk recomputed in backward (torch.utils.checkpoint) so no float32 B x T x V ever exists.
    extras: also per-token entropy (S, L) and the kept-token bits (N, V/8) in mask order, or None; both without grad.
    compiled: the transformer through model.compiled_hidden() and the head's chunks through torch.compile."""
    seqs, clen = batch["seqs"], batch["clen"]
    mask = torch.arange(int(clen.max()), device=seqs.device)[None, :] < clen[:, None]
    layout = batch["layout"]
    h = M.compiled_hidden()(model, seqs, layout=layout) if compiled else model.hidden(seqs, layout=layout)
    h = h.reshape(-1, h.shape[-1])[batch["src"]]
    targets = seqs.reshape(-1)[batch["tgt"]]
    logps, ents, kepts = [], [], []
    chunk_fn = _compiled_chunk_logprobs() if compiled else _chunk_logprobs
    for i in range(0, len(targets), chunk_rows):
        args = (model, h[i:i + chunk_rows], targets[i:i + chunk_rows],
                None if kept_bits is None else kept_bits[i:i + chunk_rows], temperature, top_k, top_p, extras)
        out = checkpoint(chunk_fn, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_fn(*args)
        if extras:
            out, ent, kept = out
            ents.append(ent)
            kepts.append(kept)
        logps.append(out)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=seqs.device)
    logp = logp.masked_scatter(mask, torch.cat(logps))
    if not extras:
        return logp, mask
    entropy = torch.zeros_like(logp).masked_scatter(mask, torch.cat(ents))
    kept = None if kepts[0] is None else torch.cat(kepts)
    return logp, mask, entropy, kept


def logprobs(model, batch, kept_bits=None, extras=False):
    """completion_logprobs with this run's temperature, training truncation, chunk size and compile switch."""
    tk, tp = training_truncation()
    return completion_logprobs(model, batch, temperature, tk, tp, kept_bits, extras, logprob_chunk_rows, compile)


def training_truncation():
    """(top_k, top_p) of the training log-probs: the sampling ones under Keep Sampling Mask, else the full softmax."""
    return (top_k, top_p) if keep_sampling_mask else (0, 1.0)


def fuses_old_logprobs(policy):
    """Old log-probs = the update forward's own, detached: right when the old policy is the current one (one update),
    train and eval forwards agree (no dropout) and the reference needs no kept sets of an old forward (untruncated)."""
    return (fuse_old_logprobs and updates_per_batch == 1 and policy.cfg.dropout == 0
            and training_truncation() == (0, 1.0))


# ---- the objective ---------------------------------------------------------------------------------------
def group_advantages(rewards, valid, scale_rewards=True, eps=1e-4):
    """rewards, valid: (P, G). -> advantages (P, G) (0 where not valid or no signal), informative (P,) bool:
    the group has >= 2 valid samples whose rewards differ. std is torch's (unbiased), as TRL's GRPO."""
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    informative = torch.zeros(rewards.shape[0], dtype=torch.bool)
    for g in range(rewards.shape[0]):
        r = rewards[g][valid[g]].float()
        if len(r) < 2 or bool(r.max() == r.min()):
            continue
        a = r - r.mean()
        adv[g][valid[g]] = a / (r.std() + eps) if scale_rewards else a
        informative[g] = True
    return adv, informative


def grpo_token_loss(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, kl_coef, delta):
    """Per-token GRPO loss (B, L), zero outside `mask`, and statistics (sums over tokens / sequences).
    logp (grad), old_logp, ref_logp (or None when kl_coef == 0): (B, L) log-probs of the sampled tokens; adv: (B,)."""
    m = mask.float()
    ratio = torch.exp(logp - old_logp)
    A = adv[:, None]
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    # V3.2 off-policy masking: a negative-advantage sequence the policy has moved away from is not pushed further
    drift = ((old_logp - logp.detach()) * m).sum(1) / m.sum(1).clamp(min=1)  # mean log(pi_old / pi_theta)
    seq_keep = ~((adv < 0) & (drift > delta))
    loss = -surrogate * seq_keep[:, None].float()
    kl = torch.zeros_like(logp)
    if kl_coef > 0:
        log_q_p = ref_logp - logp  # log(pi_ref / pi_theta)
        kl = ratio * (torch.exp(log_q_p) - log_q_p - 1)  # V3.2: k3 weighted by pi_theta/pi_old: unbiased KL(theta||ref)
        loss = loss + kl_coef * kl
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    with torch.no_grad():
        live = mask & seq_keep[:, None]  # tokens whose policy term counts
        stats = {"tokens": m.sum(), "seqs": torch.tensor(float(len(adv))),
                 "clip_low": ((ratio < 1 - eps_low) & (A < 0) & live).float().sum(),  # clipped: no gradient from these
                 "clip_high": ((ratio > 1 + eps_high) & (A > 0) & live).float().sum(),
                 "kl": (kl.detach() * m).sum(), "masked_seqs": (~seq_keep).float().sum(),
                 "abs_log_ratio": ((logp.detach() - old_logp).abs() * m).sum()}
    return loss, stats


# ---- rollouts and rewards -----------------------------------------------------------------------------------
def decode(tok, ids):
    """Text of token ids, without EOS and without ids beyond the tokenizer (the model's vocab is padded to x64)."""
    V, eos = tok.vocab_size, tok.eos_id  # locals: the filter reads them per id
    return tok.decode([i for i in ids if i < V and i != eos])


def stop_length(tok, ids, stops=tasks.STOP_STRINGS):
    """Number of tokens up to and including the first stop string (len(ids) if none); binary search on decodes."""
    def has_stop(k):
        text = decode(tok, ids[:k])
        return any(s in text for s in stops)
    if not ids or not has_stop(len(ids)):
        return len(ids)
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
    return lo


@torch.no_grad()
def rollout(model, prompt_ids, eos_id, autocast=nullcontext(), decoder=None):
    """G samples per prompt. -> (rows: the prompt of each sample, tokens (P*G, max_new) cpu, lengths (P*G,) cpu).
    decoder: an engine.Engine over model, kept from step to step (keep_decoder); None = engine.generate each call."""
    rows = [p for p in prompt_ids for _ in range(samples_per_prompt)]
    model.eval()
    outs, lens = [], []
    for i in range(0, len(rows), rollout_batch):
        with autocast:
            args = (rows[i:i + rollout_batch], max_new_tokens, temperature, top_k or None, top_p, eos_id)
            if decoder is not None:
                out, n = decoder.generate(*args)
            else:
                out, n = engine.generate(model, *args, compile=compile)
        outs.append(out.cpu())
        lens.append(n.cpu())
    return rows, torch.cat(outs), torch.cat(lens)


def grade(text, example):
    """The reward function of training: tasks.grade of the example's task -> (reward, parsable)."""
    return tasks.grade(example["task"], text, example)


def score(tok, examples, tokens, lengths, reward_fn=grade):
    """Cut each completion (at its EOS, or just after the first stop string), decode, reward. -> per-sample lists.
    reward_fn(text, example) must depend on its arguments only: a prompt's identical samples are scored once."""
    G = samples_per_prompt
    rows, raw_lens = tokens.tolist(), lengths.tolist()  # one conversion for the batch, not a slice + tolist per row
    s = {k: [] for k in ("completion", "text", "reward", "parsable", "finished", "raw_len")}
    scored = {}  # (prompt, ids) -> (ids, text, reward, parsable, finished): a group's repeats (" B" + EOS) once
    for i, (row, n) in enumerate(zip(rows, raw_lens)):
        ids = row[:n]
        key = (i // G, tuple(ids))
        if key not in scored:
            finished = ids[-1] == tok.eos_id  # the row's own last sampled token (lengths say where it ends)
            body = ids[:-1] if finished else ids
            text = decode(tok, body)  # decode drops EOS: also the text of ids
            if cut_at_stop_strings and any(st in text for st in tasks.STOP_STRINGS):  # search only where one is
                k = stop_length(tok, body)
                if k < len(body):
                    ids, finished, text = body[:k], True, decode(tok, body[:k])
            r, parsable = reward_fn(text, examples[i // G])
            scored[key] = ids, text, float(r), bool(parsable), finished
        ids, text, r, parsable, finished = scored[key]
        for k, v in zip(s, (list(ids), text, r, parsable, finished, n)):  # a list per sample: repeats share no list
            s[k].append(v)
    s["repetition"] = tasks.runaway_repetition_rows(s["completion"]).tolist()  # all rows in one numpy pass
    return s


# ---- the update -------------------------------------------------------------------------------------------
@torch.no_grad()
def prepare_microbatches(policy, ref, prompts, completions, adv, autocast=nullcontext()):
    """pack_rows batches of micro_batch samples with their old and reference log-probs, by the same code, in the
    same micro-batches and eval mode as the update, so its first ratio is exactly 1 (eager). Each also carries its
    entropy sum. Under fuses_old_logprobs no policy forward runs here: "old" is None, the update takes its own."""
    dev, fuse = next(policy.parameters()).device, fuses_old_logprobs(policy)
    share = 0 if policy.cfg.dsa_top_k else share_prompts  # DSA layers take no packed layout
    if share:  # a prompt's samples together (shortest prompts first): they share rows
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i], len(completions[i])))
    else:  # similar lengths together: less padding
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    policy.eval()
    mbs = []
    for s in range(0, len(order), micro_batch):
        ids = order[s:s + micro_batch]
        batch = pack_rows([prompts[i] for i in ids], [completions[i] for i in ids], dev,
                          multiple=16 if compile else 1, max_len=policy.cfg.block_size, share=share)  # fewer shapes
        mb = {"batch": batch, "adv": adv[ids].to(dev), "old": None, "kept": None, "ref": None, "entropy": 0.0}
        with autocast:
            if not fuse:
                mb["old"], mask, ent, mb["kept"] = logprobs(policy, batch, extras=True)
                mb["entropy"] = float((ent * mask).sum())
            if ref is not None and kl_coef > 0:  # the reference over the same kept sets: KL between like supports
                mb["ref"] = logprobs(ref, batch, mb["kept"])[0]
        mbs.append(mb)
    return mbs


def backward_on_batch(policy, mbs, n_tokens, autocast=nullcontext()):
    """Accumulate into .grad the gradient of sum_{tokens of the step} loss / n_tokens, micro-batch by micro-batch.
    -> summed statistics. A fused micro-batch (no "old") takes this forward's log-probs, detached, and its entropy."""
    stats = {}
    for mb in mbs:
        fused = mb["old"] is None
        with autocast:
            logp, mask, *extra = logprobs(policy, mb["batch"], mb["kept"], extras=fused)
        loss, st = grpo_token_loss(logp, logp.detach() if fused else mb["old"], mb["ref"], mb["adv"], mask,
                                   eps_low, eps_high, kl_coef, delta)
        (loss.sum() / n_tokens).backward()
        st["loss"] = loss.detach().sum() / n_tokens
        st["entropy"] = (extra[0] * mask).sum() if fused else mb["entropy"]
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    return stats


def grpo_step(policy, ref, optimizer, tok, examples, lr_now, autocast=nullcontext(), reward_fn=grade, decoder=None):
    """One GRPO step on `examples` (P prompts). -> (metrics, scored samples). metrics has "no_signal" when no group
    carried signal (no update), "skipped" when an update's loss or grad-norm was not finite (not applied)."""
    P, G = len(examples), samples_per_prompt
    sync = torch.cuda.synchronize if next(policy.parameters()).is_cuda else (lambda: None)
    t0 = time.time()
    rows, tokens, lengths = rollout(policy, [tok.encode(e["prompt"]) for e in examples], tok.eos_id, autocast, decoder)
    t_roll = time.time() - t0
    s = score(tok, examples, tokens, lengths, reward_fn)
    rewards = torch.tensor(s["reward"]).view(P, G)
    degenerate = ~torch.tensor(s["parsable"]) | torch.tensor(s["repetition"])
    valid = ~degenerate.view(P, G) if drop_degenerate else torch.ones(P, G, dtype=torch.bool)
    adv, informative = group_advantages(rewards, valid, scale_rewards, adv_eps)
    keep = valid & informative[:, None] if drop_zero_std else valid
    idx = keep.flatten().nonzero().flatten().tolist()
    clen = torch.tensor([len(c) for c in s["completion"]], dtype=torch.float32)
    m = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
         "accuracy": (rewards >= 1).float().mean().item(), "parsable": float(np.mean(s["parsable"])),
         "frac_zero_std": 1.0 - (rewards.max(1).values != rewards.min(1).values).float().mean().item(),
         "frac_degenerate": degenerate.float().mean().item(), "repetition": float(np.mean(s["repetition"])),
         "len_mean": clen.mean().item(), "len_max": int(clen.max()), "truncated": 1.0 - float(np.mean(s["finished"])),
         "trained_seqs": len(idx), "rollout_tok_s": sum(s["raw_len"]) / max(t_roll, 1e-9), "t_rollout": t_roll,
         "t_score": time.time() - t0 - t_roll}
    if not idx:  # nothing carries signal: no update (the optimizer state is untouched)
        m.update({"t_step": time.time() - t0, "no_signal": 1})
        return m, s
    t1 = time.time()
    prompts, comps = [rows[i] for i in idx], [s["completion"][i] for i in idx]
    mbs = prepare_microbatches(policy, ref, prompts, comps, adv.flatten()[idx], autocast)
    n_tokens = sum(map(len, comps))
    sync()
    t2 = time.time()
    for group in optimizer.param_groups:
        group["lr"] = lr_now
    policy.train()
    totals = {}
    for mu in range(1, updates_per_batch + 1):
        optimizer.zero_grad(set_to_none=True)
        st = backward_on_batch(policy, mbs, n_tokens, autocast)
        totals = {k: totals.get(k, 0.0) + v for k, v in st.items()}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip or math.inf))
        if not (math.isfinite(st["loss"]) and math.isfinite(grad_norm)):  # applied, it would poison the weights
            m["skipped"] = 1
            break
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    sync()
    t3 = time.time()
    t = {k: v / mu for k, v in totals.items()}  # means over the updates run
    m.update({k: t[k] / max(n_tokens, 1) for k in ("kl", "clip_low", "clip_high", "abs_log_ratio", "entropy")})
    m.update({"loss": t["loss"], "masked_frac": t["masked_seqs"] / t["seqs"], "grad_norm": grad_norm, "lr": lr_now,
              "train_tokens": n_tokens, "train_tok_s": mu * (n_tokens + sum(map(len, prompts))) / max(t3 - t2, 1e-9),
              "t_logprobs": t2 - t1, "t_train": t3 - t2, "t_step": time.time() - t0})
    return m, s


# ---- evaluation (also used by eval.py) ---------------------------------------------------------------------
def check_data(path, task):
    """Check every row of a task jsonl as tasks.load_task will read it: a bad line is one error with file:line."""
    mcq = ("question", "options", "answer_idx")
    need = {"gsm8k": ("question", "answer"), "addition": ("prompt", "answer")}.get(task, mcq)
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(f"{where}: not UTF-8 at byte {e.start} of the line; re-encode the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{where}: bad JSON ({e})")
            if not isinstance(row, dict):
                raise SystemExit(f"{where}: a row must be a JSON object, not {type(row).__name__}")
            if not {"prompt", "answer"} <= row.keys():  # uniform rows (prompt/answer) suit every task
                missing = [k for k in need if k not in row]
                if missing:
                    raise SystemExit(f"{where}: a {task} row needs the fields {', '.join(need)} (or prompt and "
                                     f"answer); missing {', '.join(missing)}; fields are {sorted(row)}")
                opts, ans = row.get("options"), row.get("answer_idx")
                if "options" in need and not (isinstance(opts, dict) and isinstance(ans, str) and ans in opts):
                    keys = sorted(opts) if isinstance(opts, dict) else opts
                    raise SystemExit(f"{where}: answer_idx {ans!r} is not one of the options {keys!r}")


def load_examples(name, path, n=0, seed=0, shuffle=False, split="train", digits=(1, 4)):
    """tasks.load_task with this file's conventions: path "" = generated (addition) or the HF hub; n 0 = all."""
    if path and not os.path.isfile(path):
        raise SystemExit(f"no data file {path} for task {name}; point train_data / eval_data (or --data) at a jsonl "
                         "of that schema")
    if path:  # a bad row is one line with file:line, not a traceback from tasks.load_task
        check_data(path, name)
    if name == "addition" and not path:  # generated; train and eval splits are disjoint by construction
        return tasks.load_task("addition", None, n=n or (1000 if split == "eval" else 100_000), seed=seed, split=split,
                               digits=tuple(digits))
    hf_split = "train" if split == "train" else {"medmcqa": "validation", "pubmedqa": "train"}.get(name, "test")
    return tasks.load_task(name, path or None, n=n or None, seed=seed, shuffle_options=shuffle, split=hf_split)


@torch.no_grad()
def evaluate_generate(model, tok, examples, max_new_tokens=32, batch_size=64, autocast=nullcontext()):
    """Greedy completions, answers extracted by tasks.py: accuracy, Wilson 95% interval, unparsable rate, letters."""
    model.eval()
    correct, parsable, outputs = [], [], []
    limit = model.cfg.block_size - max_new_tokens
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [tok.encode(e["prompt"])[-limit:] for e in chunk]  # over-long prompts keep their end ("Answer:")
        with autocast:
            out, lens = model.generate(prompts, max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
        for e, row, n in zip(chunk, out.tolist(), lens.tolist()):
            pred = tasks.extract_answer(e["task"], decode(tok, row[:n]), e)
            r, ok = tasks.grade_answer(e["task"], pred, e)
            correct.append(r)
            parsable.append(ok)
            outputs.append(pred)
    res = tasks.summarize(correct, parsable)
    if examples and examples[0]["task"] in tasks.MCQ_TASKS:
        res["predicted"] = {L: outputs.count(L) for L in sorted(set(o for o in outputs if o))}
    return res


@torch.no_grad()
def evaluate_loglik(model, tok, examples, batch_size=64, autocast=nullcontext()):
    """lm-eval-harness medqa_4options style: the prompt (ending 'Answer:') continued by ' A', ' B', ...; the option
    with the highest summed log-likelihood is the prediction. Never unparsable."""
    model.eval()
    rows = []  # (example index, letter, context ids, continuation ids)
    for k, e in enumerate(examples):
        ctx = tok.encode(e["prompt"])
        for L in e["options"]:
            cont = tok.encode(" " + L)
            rows.append((k, L, ctx[-(model.cfg.block_size - len(cont)):], cont))
    scores = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))  # similar lengths together: less padding
    device = model.rope_cos.device
    for s in range(0, len(order), batch_size):
        ids = order[s:s + batch_size]
        batch = pack_rows([rows[i][2] for i in ids], [rows[i][3] for i in ids], device, share=model.cfg.block_size)
        with autocast:  # an example's options share one row: its context runs once
            logp, mask = completion_logprobs(model, batch)
        for i, v in zip(ids, (logp * mask).sum(1).tolist()):
            scores[i] = v
    best = {}
    for (k, L, _, _), v in zip(rows, scores):
        if k not in best or v > best[k][1]:
            best[k] = (L, v)
    preds = [best[k][0] for k in range(len(examples))]
    res = tasks.summarize([float(p == e["answer"]) for p, e in zip(preds, examples)], [True] * len(examples))
    res["predicted"] = {L: preds.count(L) for L in sorted(set(preds))}
    return res


def evaluate(model, tok, examples, mode="both", max_new_tokens=32, batch_size=64, autocast=nullcontext()):
    """{"generate": summary, "loglik": summary} (loglik only for multiple-choice tasks)."""
    out = {}
    mcq = bool(examples) and examples[0]["task"] in tasks.MCQ_TASKS
    if mode in ("loglik", "both") and mcq:
        out["loglik"] = evaluate_loglik(model, tok, examples, batch_size, autocast)
    if mode in ("generate", "both") or not mcq:
        out["generate"] = evaluate_generate(model, tok, examples, max_new_tokens, batch_size, autocast)
    return out


def format_eval(results):
    return " | ".join(f"{m}: acc {r['acc']:.4f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}] n={r['n']} unparsable "
                      f"{r['unparsable']:.3f}" + (f" predicted {r['predicted']}" if "predicted" in r else "")
                      for m, r in results.items())


# ---- model loading and the reward curve -------------------------------------------------------------------------
def char_meta(texts):
    chars = sorted(set("".join(texts)) | set("\n "))
    return {"tokenizer": "char", "chars": chars, "vocab_size": len(chars) + 1, "eos_id": len(chars)}


def load_model_and_tokenizer(source, device, scratch_preset="debug", scratch_texts=()):
    """checkpoint.load_model with dropout 0 (RL with dropout would move the ratio off 1 by noise) and the checkpoint's
    tokenizer. source "scratch": random weights, a char tokenizer over scratch_texts. -> (model, tokenizer, ckpt)."""
    if source == "scratch":
        ckpt = {"tokenizer": char_meta(scratch_texts), "kind": "scratch"}
        model = GPT(make_config(scratch_preset, vocab_size=ckpt["tokenizer"]["vocab_size"])).to(device)
    else:
        model, ckpt = load_model(source, device, dropout=0.0)
    if "tokenizer" not in ckpt:
        raise SystemExit(f"{source} has no tokenizer entry; cannot turn prompts into tokens")
    tok = load_tokenizer(ckpt["tokenizer"])
    if tok.vocab_size > model.cfg.vocab_size:
        raise SystemExit(f"{source}: tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
    return model, tok, ckpt


def plot_curve(out_dir):
    """out_dir/log.jsonl -> reward_curve.png: reward per step (and its 10-step mean), held-out accuracy (95% CI)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    trained = [r for r in records if "reward_mean" in r]
    steps, reward = [r["step"] for r in trained], [r["reward_mean"] for r in trained]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, color="tab:blue", alpha=0.35, label="train reward (per step)")
    smooth = [float(np.mean(reward[max(0, i - 9):i + 1])) for i in range(len(reward))]
    ax.plot(steps, smooth, color="tab:blue", label="train reward (10-step mean)")
    for key, color in (("eval_generate_acc", "tab:red"), ("eval_loglik_acc", "tab:green")):
        ev = [r for r in records if key in r]
        if ev:
            lo, hi = key.replace("_acc", "_ci_lo"), key.replace("_acc", "_ci_hi")
            ax.errorbar([r["step"] for r in ev], [r[key] for r in ev],
                        yerr=[[r[key] - r[lo] for r in ev], [r[hi] - r[key] for r in ev]],
                        color=color, marker="o", capsize=3, label=key.replace("_acc", "") + " acc (95% CI)")
    ax.set(xlabel="GRPO step", ylabel="reward / accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reward_curve.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    config = configure(globals())
    gpu_faults_in_one_line(lambda: f"after step {step}; the last checkpoint written: {saved}" if "saved" in globals()
                           else "before training", "lower micro_batch (the same gradient at any size) or rollout_batch")
    dev, autocast, dtype = setup_device(device, dtype, seed)
    A.ATTENTION, M.RESIDUAL = attention, residual
    if not temperature > 0:
        raise SystemExit("temperature must be > 0: GRPO needs sampled groups, and log-probs are taken at it")
    check_values(config, {"eval_mode": ("loglik", "generate", "both"), "attention": ("sdpa", "flash"),
                          "residual": ("autocast", "fp32")},
                 ("updates_per_batch", "micro_batch", "prompts_per_step", "rollout_batch", "max_new_tokens",
                  "eval_batch", "logprob_chunk_rows"), ("lr", "weight_decay", "kl_coef", "grad_clip"))
    if samples_per_prompt < 2:  # a group of one has no spread to compare against
        raise SystemExit(f"config error: samples_per_prompt must be at least 2, not {samples_per_prompt}")

    # ---- data (checked before any GPU work) ----
    for name in (task, eval_task):
        if name not in tasks.TASKS:
            raise SystemExit(f"unknown task {name!r}; one of {tasks.TASKS}")
    eval_examples = load_examples(eval_task, eval_data, eval_n, eval_seed, False, "eval", addition_digits)
    if not eval_examples:
        raise SystemExit(f"no evaluation examples in {eval_data or eval_task}")
    train_examples = [] if eval_only else load_examples(task, train_data, train_n, seed, shuffle_options, "train",
                                                        addition_digits)
    if not eval_only and not train_examples:
        raise SystemExit(f"no training prompts in {train_data or task}")
    if train_data and eval_data and os.path.abspath(train_data) == os.path.abspath(eval_data):
        held = {e["id"] for e in eval_examples}
        train_examples = [e for e in train_examples if e["id"] not in held]
        print(f"evaluation reads the training file: its {len(held)} examples are held out of training")

    # ---- model, reference, optimizer ----
    resume = init_from == "resume"
    start = os.path.join(out_dir, "ckpt.pt") if resume else init_from
    texts = [e["prompt"] + " " + str(e["answer"]) for e in train_examples + eval_examples]
    policy, tok, ckpt = load_model_and_tokenizer(start, dev, scratch_preset, texts)
    if resume and ckpt.get("kind") != "grpo":
        what = "a train.py checkpoint" if ckpt.get("kind") == "pretrain" else "not one"
        raise SystemExit(f"--init_from=resume needs a grpo.py checkpoint in out_dir; {start} is {what} "
                         f"(kind {ckpt.get('kind')!r}): start with --init_from={start}")
    policy.cfg.checkpoint_activations = checkpoint_activations
    ref_path = (ckpt.get("ref_from") or "") if resume else ref_from or ("" if init_from == "scratch" else init_from)
    ref = None
    if kl_coef > 0:
        if resume and ckpt.get("ref_model") is not None:  # a scratch run's reference lives in its checkpoint
            ref = load_model({"model_config": asdict(policy.cfg), "model": ckpt["ref_model"]}, dev)[0]
        elif resume and not ref_path:
            raise SystemExit(f"{start} does not say which reference model it used: resume with --kl_coef=0")
        else:
            ref = load_model(ref_path, dev)[0] if (resume or ref_from) else deepcopy(policy)
        ref.eval().requires_grad_(False)
    optimizer = policy.configure_optimizer(lr, weight_decay, (beta1, beta2), dev.type)
    step, data_state, tokenizer_meta = 0, {"epoch": 0, "pos": 0}, ckpt["tokenizer"]
    if resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, data_state = ckpt["step"], ckpt["data_state"]
        set_rng_state(ckpt["rng"], dev)
    del ckpt
    limit = policy.cfg.block_size - max_new_tokens
    n_before = len(train_examples)
    try:  # a char tokenizer pretrained on other text may lack a prompt's characters: say so before any step
        lengths = [len(tok.encode(e["prompt"])) for e in train_examples + eval_examples]
    except ValueError as e:
        raise SystemExit(f"{init_from}'s tokenizer cannot encode the {task} / {eval_task} prompts ({e}): pretrain on "
                         "text that covers them, or with the gpt2 tokenizer")
    train_examples = [e for e, n in zip(train_examples, lengths) if n <= limit]
    if not eval_only and not train_examples:
        raise SystemExit(f"no training prompt fits the context: every prompt + max_new_tokens > block_size "
                         f"{policy.cfg.block_size}")

    make_out_dir(out_dir)
    if not eval_only:  # a killed save's temporary file: this run owns out_dir (eval_only may read a live run's)
        remove_stale_temps(out_dir)
    print(json.dumps(config, indent=1))
    print(f"switches: ATTENTION={A.ATTENTION} RESIDUAL={M.RESIDUAL} LOSS_CHUNK_ROWS={M.LOSS_CHUNK_ROWS} "
          f"dtype={dtype} device={dev} checkpoint_activations={checkpoint_activations} compile={compile} "
          f"fuse_old_logprobs={fuses_old_logprobs(policy)}")
    print(f"model: {policy.num_params():,} parameters, {asdict(policy.cfg)}; tokenizer {tokenizer_meta['tokenizer']} "
          f"({tok.vocab_size} ids); reference: {'none' if ref is None else ref_path or 'the starting weights'}")
    print(f"sampling: temperature {temperature}, top_k {top_k or 'off'}, top_p {top_p if top_p < 1 else 'off'}; "
          + ("untruncated: training log-probs over the full softmax" if not (top_k or top_p < 1) else
             "truncated: training log-probs over the kept set of sampling (Keep Sampling Mask)" if keep_sampling_mask
             else "truncated, but training log-probs over the full softmax (keep_sampling_mask=False: a known bias)"))
    print(f"data: {len(train_examples):,} training prompts ({task}; {n_before - len(train_examples)} too long), "
          f"{len(eval_examples)} eval examples ({eval_task})")

    def run_eval(at_step):
        t = time.time()
        res = evaluate(policy, tok, eval_examples, eval_mode, eval_max_new_tokens, eval_batch, autocast)
        print(f"eval step {at_step} ({eval_task}, {time.time() - t:.0f}s): {format_eval(res)}")
        for e in eval_examples[:show_samples]:
            with autocast:
                out, n = policy.generate([tok.encode(e["prompt"])[-limit:]], eval_max_new_tokens, 0.0,
                                         eos_id=tok.eos_id)
            print(f"  sample: ...{e['prompt'][-60:]!r} -> {decode(tok, out[0, :n[0]].tolist())!r}  "
                  f"[answer {e['answer']}]")
        return {f"eval_{m}_{k}": v for m, r in res.items() for k, v in r.items() if not isinstance(v, dict)}

    if eval_only:
        ev = run_eval(step)
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump({"init_from": init_from, "eval_task": eval_task, "eval_data": eval_data, **ev}, f, indent=1)
        sys.exit(0)

    def save(at_step):
        """-> whether ckpt.pt was written (save_checkpoint warns when not)."""
        ck = {"model_config": asdict(policy.cfg), "model": policy.state_dict(), "optimizer": optimizer.state_dict(),
              "step": at_step, "tokens_seen": 0, "data_state": dict(data_state), "rng": rng_state(dev),
              "config": config, "tokenizer": tokenizer_meta, "best_val_loss": float("inf"), "kind": "grpo",
              "ref_from": ref_path,
              "ref_model": ref.state_dict() if ref is not None and not ref_path else None}  # scratch: no file to name
        ok = save_checkpoint(os.path.join(out_dir, "ckpt.pt"), ck)
        plot_curve(out_dir)
        if ok:
            print(f"saved {out_dir}/ckpt.pt at step {at_step}")
        return ok

    def next_prompts():
        """P prompts, walking seeded permutations of the training set (one per epoch); resumable by data_state."""
        out = []
        while len(out) < prompts_per_step:
            order = np.random.default_rng([seed, data_state["epoch"]]).permutation(len(train_examples))
            take = order[data_state["pos"]:data_state["pos"] + prompts_per_step - len(out)]
            out += [train_examples[i] for i in take]
            data_state["pos"] += len(take)
            if data_state["pos"] >= len(train_examples):
                data_state["epoch"], data_state["pos"] = data_state["epoch"] + 1, 0
        return out

    def guarded(fn, *args):
        """fn(*args), where generate() refusing NaN / inf logits ends the run: no update can mend such weights."""
        try:
            return fn(*args)
        except RuntimeError as e:
            if "NaN" not in str(e):
                raise
            raise SystemExit(f"stopping after step {step}: the policy's logits are NaN or inf (an update broke its "
                             f"weights: lr too high?); the last checkpoint written: {saved}")

    log = run_logger(out_dir, step if resume else None)
    stop = stop_signals()  # preemption / Ctrl-C: finish the step, checkpoint, exit 0
    if step == 0:
        log({"step": 0, **run_eval(0)})
    t_start, start_step, bad_steps, failed_saves = time.time(), step, 0, 0
    saved = f"{out_dir}/ckpt.pt (step {step})" if resume else "none written"
    decoder = engine.Engine(policy, compile=compile) if keep_decoder else None  # one for the run's rollouts
    while step < max_steps and not stop:
        lr_now = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        m, _ = guarded(grpo_step, policy, ref, optimizer, tok, next_prompts(), lr_now, autocast, grade, decoder)
        step += 1
        if dev.type == "cuda":
            m["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        eta = (max_steps - step) * (time.time() - t_start) / (step - start_step)
        print(f"step {step}/{max_steps} | reward {m['reward_mean']:.3f} (std {m['reward_std']:.3f}) | zero-std "
              f"{m['frac_zero_std']:.2f} | len {m['len_mean']:.0f}/{m['len_max']} trunc {m['truncated']:.2f} | "
              + ("no informative group: no update | " if m.get("no_signal") else
                 f"kl {m['kl']:.4f} | clip {m['clip_low']:.3f}/{m['clip_high']:.3f} | masked {m['masked_frac']:.2f} | "
                 f"ent {m['entropy']:.2f} | gnorm {m['grad_norm']:.2f} | train {m['train_tok_s']:,.0f} tok/s | ")
              + f"rollout {m['rollout_tok_s']:,.0f} tok/s | {m['t_step']:.1f}s | ETA {eta / 60:.1f} min", flush=True)
        bad_steps = bad_steps + 1 if m.get("skipped") else bad_steps if m.get("no_signal") else 0  # in a row: updates
        if m.get("skipped"):
            print(f"step {step}: non-finite loss {m['loss']} / grad-norm {m['grad_norm']}: update skipped "
                  f"({bad_steps} in a row)", flush=True)
        if (eval_every and step % eval_every == 0) or step == max_steps:
            m.update(guarded(run_eval, step))
        log({"step": step, **m})
        if step % save_every == 0 or step == max_steps or stop or bad_steps >= max_bad_steps:
            if not all(bool(torch.isfinite(p).all()) for p in policy.parameters()):  # never checkpoint NaN / inf
                raise SystemExit(f"stopping at step {step}: an update made the weights NaN or inf (lr too high?); "
                                 f"the last checkpoint written: {saved}")
            ok = save(step)
            saved, failed_saves = (f"{out_dir}/ckpt.pt (step {step})", 0) if ok else (saved, failed_saves + 1)
        if bad_steps >= max_bad_steps:  # skipped updates left the weights as the last good update made them
            raise SystemExit(f"stopping: {bad_steps} non-finite steps in a row; the last checkpoint written: {saved}")
        if failed_saves >= max_failed_saves:
            raise SystemExit(f"stopping: {failed_saves} checkpoint writes in a row failed; the last checkpoint "
                             f"written: {saved}")
    if stop:
        print(f"stopped by signal after step {step}; resume with --init_from=resume")

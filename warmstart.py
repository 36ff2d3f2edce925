"""Warm start: supervised fine-tuning of the tiny Qwen2.5-VL on the synthetic task's worked solutions.

RL only learns where the policy is sometimes right, and a random tiny model never writes a boxed answer. So the
offline demo starts from a checkpoint trained here to imitate the worked solutions of data.py's synthetic task
(read the grid row by row in <think>, then box the count): it learns the format and the reading, and counts
imperfectly. The result is saved in Hugging Face format (weights in fp16, ~2.6 MB) under `out_dir`, which
`model.load_policy(out_dir)` loads; the demo ships it, so this script only runs to rebuild it:

    python warmstart.py                                  # ~15 minutes on 2 CPU cores, writes assets/tiny-synthetic
    python warmstart.py --steps=5 --out_dir=/tmp/ws      # a quick end-to-end check
"""
import json
import os
import sys
import time

import torch

import data
import eval as evaluation
from configurator import get_config
import rewards
from model import build_tiny, load_policy, response_hidden, sample, token_logprobs
from train import get_lr

# ----------------------------------------------------------------------------- constants
out_dir = "assets/tiny-synthetic"
task = "synthetic"          # synthetic (the demo's counting) | synthetic_score (the collapse testbed's scoring)
seed = 0
init_from = ""              # "": a new random tiny model; else a checkpoint to continue from (its size wins)
steps = 700                 # at most: the learning-rate schedule spans this many
batch_size = 32
lr = 1e-3
warmup = 30                 # linear warmup steps, then cosine decay to lr / 10
weight_decay = 0.0
grad_clip = 1.0
text_layers = 4             # model size (model.tiny_config): the demo's default tiny model
text_hidden = 128
vision_depth = 2
vision_hidden = 64
log_interval = 50
# Stop early, on purpose: RL needs a policy that is sometimes right, not one that already solves the task (left
# alone, greedy accuracy jumps from ~30% to ~65% between steps 500 and 600 as counting clicks).
stop_accuracy = 0.35        # stop once greedy validation accuracy reaches this (0: train all `steps`)
stop_consistency = 0.8      # synthetic_score: and once this share of greedy answers follows from their own counts
eval_start = 300            # first validation step
eval_interval = 25          # then every this many steps
val_n = 100                 # validation problems per check
test_n = 200                # held-out test problems for the final report
test_samples = 0            # > 0: the report also samples this many responses per test problem
max_response_len = 96       # same as the demo's rollouts
save_dtype = "float16"      # the shipped weights; load_policy casts them back to float32
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}
SYN_PIXELS = 112 * 112      # min_pixels = max_pixels = the synthetic image's area: load_image never resizes it


def sft_batch(tok, records):
    """Records -> teacher-forcing inputs: prompt left-padded to P, solution + <|im_end|> right-padded to L.

    Returns input_ids, attention_mask: (B, P + L); pixel_values: (B * 64, 1176); image_grid_thw: (B, 3);
    targets, target_mask: (B, L), the response tokens and which of them are real; prompt_len: P.
    """
    images, prompts = zip(*[data.prepare(r, tok, SYN_PIXELS, SYN_PIXELS) for r in records])
    # the stop token is part of the target: the policy must learn to end its answer
    answers = [tok.encode(r["solution"], add_special_tokens=False) + [tok.eos_token_id] for r in records]
    B, P, L = len(records), max(map(len, prompts)), max(map(len, answers))
    ids = torch.full((B, P + L), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, P + L), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, P - len(p):P], ids[i, P:P + len(a)] = torch.tensor(p), torch.tensor(a)
        mask[i, P - len(p):P + len(a)] = 1
    pixel_values, grid = data.batch_pixels(images)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_grid_thw": grid,
            "targets": ids[:, P:], "target_mask": mask[:, P:], "prompt_len": P}


def sft_loss(policy, batch):
    """Mean cross-entropy over the batch's response tokens, through the same log-prob function as GRPO."""
    hidden = response_hidden(policy, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             batch["image_grid_thw"], batch["prompt_len"])  # (B, L, D)
    logp, _ = token_logprobs(hidden, policy.lm_head, batch["targets"], batch["target_mask"])  # (B, L)
    return -logp.sum() / batch["target_mask"].sum()


def greedy_eval(policy, tok, split, n, cfg, n_samples=0):
    """Greedy accuracy, format rate and (synthetic_score) reasoning consistency on the first n problems of a
    synthetic split (eval.py's evaluation) -> dict; n_samples > 0 adds the same over that many samples per problem
    at temperature 1 (what RL starts from): "sampled_accuracy", "sampled_consistency"."""
    records = data.synthetic_split(split, n=n, task=cfg.task)
    result = evaluation.evaluate(policy, tok, records, SYN_PIXELS, SYN_PIXELS, cfg.max_response_len)
    out = {"accuracy": result["accuracy"], "format": result["format"], "consistency": None}
    if cfg.task == "synthetic_score":
        out["consistency"] = sum(data.score_consistent(s["response"]) for s in result["samples"]) / len(records)
    if n_samples:
        images, prompts = zip(*[data.prepare(r, tok, SYN_PIXELS, SYN_PIXELS) for r in records])
        texts = []
        for i in range(0, n, 16):
            drawn = sample(policy, tok, list(prompts[i:i + 16]), list(images[i:i + 16]), n_samples, cfg.max_response_len)
            texts += tok.batch_decode(drawn["response_ids"], skip_special_tokens=True)
        answers = [r["answer"] for r in records for _ in range(n_samples)]
        out["sampled_accuracy"] = sum(rewards.score(t, a)["accuracy"] for t, a in zip(texts, answers)) / len(texts)
        if cfg.task == "synthetic_score":
            out["sampled_consistency"] = sum(map(data.score_consistent, texts)) / len(texts)
    return out


def main(argv):
    """Train, evaluate on the test split, save to cfg.out_dir. Returns {"accuracy", "format", "loss", "seconds"}."""
    cfg = get_config(DEFAULTS, argv)
    if cfg.init_from:
        policy, tok = load_policy(cfg.init_from)
    else:
        policy, tok = build_tiny(cfg.seed, cfg.text_layers, cfg.text_hidden, cfg.vision_depth, cfg.vision_hidden)
    print(f"tiny Qwen2.5-VL: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # its own stream (seed + 1): the RL demo's train split (seed 0) stays problems the warm start never saw
    stream = data.synthetic_stream("train", seed=cfg.seed + 1, task=cfg.task)
    t0, loss_avg = time.time(), None
    policy.train()
    for step in range(cfg.steps):
        batch = sft_batch(tok, [next(stream) for _ in range(cfg.batch_size)])
        loss = sft_loss(policy, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg.lr, cfg.steps, cfg.warmup)
        optimizer.step()
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()  # smoothed for the log
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.steps:
            print(f"step {step + 1}/{cfg.steps}  loss {loss_avg:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f}s")
        if cfg.stop_accuracy and step + 1 >= cfg.eval_start and (step + 1 - cfg.eval_start) % cfg.eval_interval == 0:
            val = greedy_eval(policy, tok, "validation", cfg.val_n, cfg)
            consistent = val["consistency"] is None or val["consistency"] >= cfg.stop_consistency
            print(f"step {step + 1}: validation greedy accuracy {100 * val['accuracy']:.1f}%  format "
                  f"{100 * val['format']:.1f}%" + (f"  consistency {100 * val['consistency']:.1f}%"
                                                  if val["consistency"] is not None else ""), flush=True)
            if val["accuracy"] >= cfg.stop_accuracy and consistent:
                break
    train_seconds = time.time() - t0

    # save in the shipped precision, then evaluate what was saved, exactly as the demo will load it
    os.makedirs(cfg.out_dir, exist_ok=True)
    policy.to(getattr(torch, cfg.save_dtype)).save_pretrained(cfg.out_dir)
    tok.save_pretrained(cfg.out_dir)
    policy, tok = load_policy(cfg.out_dir)
    test = greedy_eval(policy, tok, "test", cfg.test_n, cfg, n_samples=cfg.test_samples)
    acc, fmt = test["accuracy"], test["format"]
    result = {**test, "loss": loss_avg, "steps": step + 1, "seconds": round(train_seconds, 1),
              "test_problems": cfg.test_n, "config": {k: getattr(cfg, k) for k in DEFAULTS}}
    with open(os.path.join(cfg.out_dir, "warmstart.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"test greedy accuracy {100 * acc:.1f}%  format {100 * fmt:.1f}%  ({cfg.test_n} problems); "
          f"trained {step + 1} steps in {train_seconds:.0f}s; saved {cfg.out_dir}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

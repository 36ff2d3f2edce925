"""SaEI: RL fine-tuning of a vision-language model with GRPO and selective-adversarial entropy intervention.

One training step:
  1. clean rollouts: n_clean responses per prompt on the image I
  2-4. EgAS + TsEC: one PGD step on I's pixels that raises the entropy of the middle-entropy tokens of
       those responses, giving I_adv (egas.py, tsec.py)
  5. adversarial rollouts: n_adv responses per prompt on I_adv
  6. rewards: 0.9 * accuracy + 0.1 * format (rewards.py)
  7. advantages: one group of n_clean + n_adv per prompt, standardized (grpo.py)
  8. update: PPO-clip on every response token, log-probs on the clean image (ppo.py; the loss in grpo.py)

Run: `python train.py` (the offline demo: config/demo.py), `python train.py --max_steps=20` (the demo, shorter),
`torchrun --nproc_per_node=8 train.py --model Qwen2.5-VL-3B` (the paper-family recipe below, on Geometry3K).
"""
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import checkpoint
import configurator
import data
import egas
import eval as evaluation
import grpo
import ppo
import rewards
from distributed import (all_reduce_sum, from_rank0, global_mean, global_std, global_sum, leave_process_group,
                         load_on_rank0, reshard, setup_distributed, shard)
from model import check_device, load_policy, sample

# ----------------------------------------------------------------------------- constants
# The constants are the paper-family recipe (NoisyRollout's released Geometry3K scripts). Given neither a config
# file nor --model, train.py starts from config/demo.py instead: the offline demo on CPU.
# what to train
model = "Qwen2.5-VL-7B"      # tiny | Qwen2.5-VL-3B | Qwen2.5-VL-7B | Qwen2.5-VL-32B | hub id | local checkpoint
dataset = "geometry3k"       # geometry3k | mmk12 | synthetic | name=path (a local copy) | a local folder or .parquet
train_split = "train"        # 2,101 problems
eval_split = "test"          # 601 problems, greedy
out_dir = "out"
# NoisyRollout's released Geometry3K recipe: a rollout batch of 512 prompts per step, updated in 4 mini-batches of
# 128 prompts (updates_per_rollout below); 60 steps are its ~15 epochs of 2,101 problems
max_steps = 60
seed = 0
batch_size = 512             # prompts per step (the rollout batch), over all ranks
# rollouts
n_clean = 6                  # n1: responses per prompt on the clean image
n_adv = 6                    # n2: responses per prompt on the perturbed image; 0 = vanilla GRPO
temperature = 1.0
rollout_chunk = 0            # at most this many responses per sampling call (whole prompts): bounds the KV cache;
                             # 0: on CUDA as many as the free memory holds (model.decode_bytes), else all at once
filter_dead_groups = False   # dynamic sampling (DAPO): replace prompts whose n_clean clean rewards are all equal
max_filter_tries = 3         # its extra sampling rounds per step; still short after them, dead groups fill the batch
max_prompt_len = 2048        # longer prompts are dropped (and counted), never truncated
max_response_len = 2048
instruction_role = "user"    # the format instruction after the problem ("user", the EasyR1 recipes) or as the system
                             # prompt ("system", as NoisyRollout's evaluation asks); eval.py uses the checkpoint's
reward_reading = False       # synthetic_score only: a right answer is rewarded only when it follows from the
                             # response's own counts (data.score_consistent), so the reasoning decides it
min_pixels = 262144          # image area bounds for smart_resize (paper recipe)
max_pixels = 1000000
# SaEI
perturb = "egas"             # egas (SaEI) | random_sign (its control: the same budget, random directions) | noise
                             # (NoisyRollout) | none (the n_adv rollouts see the clean image);
                             # egas.PERTURBATIONS lists them
tsec_band = (1 / 3, 2 / 3)   # entropy-rank quantiles of the tokens the attack targets; (0.0, 1.0) = no selection
tsec_scope = "group"         # rank tokens within each prompt's group of n_clean responses, or per "response"
pgd_steps = 1                # T
pgd_alpha = 2 / 255          # step size on [0, 1] pixels; negative descends the entropy (a sanity ablation)
pgd_eps = 0.0                # L-inf radius around the clean image; 0: |pgd_alpha| * pgd_steps (our default)
logprob_image = "clean"      # image the update conditions adversarial responses on: clean | adversarial
adv_old_logprob = "clean"    # pi_old of the adversarial half, in its PPO ratio: "clean" = pi_old(o|I), the paper
                             # family's convention (with one update per rollout its ratio is exactly 1, unbounded by
                             # the clip although those responses were drawn from pi_old(.|I_adv)); "behaviour" =
                             # pi_old(o|I_adv), the image it was sampled on: the off-policy step corrected and clipped
                             # (its ratio can be far from 1: see clip_dual)
# update
lr = 1e-6
lr_decay = False             # cosine decay from lr to lr / 10 over max_steps; the papers keep lr constant
warmup_steps = 0             # linear warmup from lr / warmup_steps to lr over the first steps (the papers use none)
weight_decay = 1e-2
scale_rewards = "group"      # advantages divided by the group's reward std (GRPO), the batch's, or "none" (Dr. GRPO)
mask_truncated_completions = False  # True: responses cut off at max_response_len get no gradient (TRL's option)
clip_low = 0.2
clip_high = 0.2
clip_dual = 3.0              # dual-clip PPO: a negative-advantage token's loss is at most -A * 3, however far its ratio
                             # rises (EasyR1's default, which the paper family trains with); 0: off
cov_control = "none"         # none | kl_cov | clip_cov: Cui et al. 2025's policy-side entropy controls, on the tokens
                             # whose log-prob x advantage covariance term is the largest (kl_cov: a penalty on their
                             # |log ratio|, the clip dropped) or lies within clip_cov_bounds (clip_cov: no gradient)
cov_ratio = 2e-4             # the fraction of each micro-batch's tokens they act on (at least one), both papers' 2e-4
kl_cov_coef = 1.0            # KL-Cov's weight on |log ratio| (the authors' recipes)
clip_cov_bounds = (1.0, 5.0) # Clip-Cov's covariance window
kl_coef = 0.0                # > 0 adds the low-variance KL to a frozen copy of the initial policy
entropy_coef = 0.0           # > 0 adds an entropy bonus (the released NoisyRollout scripts use 1e-3; the papers do not)
pg_tokens = "all"            # tokens that get policy gradient: all | vepo (VEPO's top 20%) | top_entropy (80/20)
grad_clip = 1.0
updates_per_rollout = 4      # optimizer steps per rollout batch, each on an equal share of its groups (PPO mini-
                             # batches): from the second on the policy is off-policy and the clip does its work
ppo_epochs = 1               # passes over the rollout batch
attack_objective = "bounded" # bounded: attack_rows responses per forward/backward, the LM head on the band only (any
                             # model size) | full_logits: the plain formula on a prompt's responses at once (the
                             # memory of their full logits: small models, the demo)
attack_rows = 1              # clean responses per forward/backward in the bounded attack (its memory: this many)
micro_batch_size = 4         # responses per forward/backward in the update;
                             # 4 and gradient checkpointing are our memory choice for 8 x 80 GB, not the papers'
logit_chunk = 1024           # response positions per LM-head chunk (memory: full logits over 152k tokens are huge)
freeze_vision = True         # the paper family freezes the vision tower (gradients still reach the image)
gradient_checkpointing = True   # recompute decoder layers in backward: less memory, ~30% more compute
# evaluation, logging, checkpoints
eval_interval = 10           # greedy held-out accuracy every this many steps (0: only before and after training)
eval_limit = 1000            # held-out problems per evaluation (Geometry3K's whole test split); 0: none
eval_samples = 0             # > 0: evaluations also sample this many answers per problem and log pass@1 ... pass@k
save_interval = 10           # also on the last step and on SIGINT/SIGTERM
resume = False               # continue from {out_dir}/checkpoint (weights, optimizer, step, RNG states)
overwrite = False            # a new run may replace the checkpoint and metrics already in out_dir
max_skipped_updates = 3      # stop after this many updates in a row were skipped as non-finite (lr too high?)
wandb_log = False            # also log every metric to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
wandb_project = "saei"
wandb_run_name = ""          # "" : wandb picks one
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # compute dtype; weights and Adam state stay fp32
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}


def get_config(argv):
    """Command line -> the run's checked configuration (cfg.n_clean reads better than cfg["n_clean"])."""
    if not any(a == "--model" or a.startswith("--model=") or not a.startswith("--") for a in argv):
        argv = ["config/demo.py", *argv]  # neither a config file nor a model: the offline demo
        print("no config file and no --model: running the offline demo, config/demo.py")
    cfg = configurator.get_config(DEFAULTS, argv)
    check_config(cfg)
    cfg.pgd_eps = cfg.pgd_eps or abs(cfg.pgd_alpha) * cfg.pgd_steps  # the attack budget: T steps of |alpha|
    return cfg


def main(argv):
    """Train; returns (start, end), the held-out evaluations before and after. However the run ends -- finished,
    stopped by a signal or by skipped updates, a bad input, a failed save, an error -- it leaves through teardown."""
    opened, error = {}, None  # what the run has set up that teardown must undo
    try:
        return run(argv, opened)
    except BaseException as e:
        error = e
        raise
    finally:
        teardown(opened, error)


def teardown(opened, error):
    """The one way out of a run: restore the signal handlers, close the wandb run, unlock out_dir (rank 0 holds the
    lock), leave the process group. Our one-line stops (SystemExit) come on every rank at the same point; any other
    error may be this rank's alone, so the process group is left without waiting for the others, which may never
    come."""
    if "restore" in opened:
        opened["restore"]()
    if opened.get("wandb"):
        opened["wandb"].finish(exit_code=0 if error is None else 1)
    checkpoint.unlock()
    leave_process_group(wait=error is None or isinstance(error, SystemExit))


def run(argv, opened):
    """main's run; `opened` gets the signal handlers' restore and the wandb run as they are set up."""
    cfg = get_config(argv)
    rank, world = setup_distributed(cfg)
    torch.manual_seed(cfg.seed + rank)  # each rank samples its own responses
    resume_from = checkpoint.start(cfg, rank, world)  # lock out_dir; the checkpoint to continue, or None
    if cfg.wandb_log:  # before the model loads: a missing login must not cost a load and an evaluation
        opened["wandb"] = start_wandb(cfg, rank)
    policy, ref, tok = build_policy(cfg, rank, world, resume_from)
    params = [p for p in policy.parameters() if p.requires_grad]
    # frozen weights never get a gradient, so AdamW skips them; listing every parameter keeps the
    # optimizer's parameter numbering identical to the model's, which the distributed state dict needs
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    first_step = checkpoint.load(policy, optimizer, resume_from, rank) + 1 if resume_from else 1
    compute = lambda: torch.autocast(cfg.device.split(":")[0], getattr(torch, cfg.dtype),
                                     enabled=world == 1 and cfg.dtype != "float32")
    train_set, eval_set = load_data(cfg, tok)
    if rank == 0 and not resume_from:
        checkpoint.clear(cfg.out_dir)  # --overwrite=True: the old run goes now that this one has started
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    group = cfg.n_clean + cfg.n_adv
    evaluate_now = lambda step: dict(evaluate_held_out(policy, tok, eval_set, cfg, rank=rank, world=world,
                                                       compute=compute), step=step)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    stop = checkpoint.install_stop_handlers()
    opened["restore"] = stop["restore"]
    if rank == 0 and resume_from:
        print(f"resuming {resume_from} at step {first_step - 1} of {cfg.max_steps}")
    start = held_out = evaluate_now(first_step - 1)
    saved = first_step - 1 if resume_from else None  # the step of the last checkpoint
    skipped = 0  # updates skipped in a row
    if rank == 0:
        when = f"at step {first_step - 1}, where this run resumes" if resume_from else "before training"
        print(f"held-out greedy accuracy {when}: {measured(start)}")
    for step in tqdm(range(first_step, cfg.max_steps + 1), desc="train", disable=None if rank == 0 else True):
        for param_group in optimizer.param_groups:
            param_group["lr"] = get_lr(step - 1, cfg.lr, cfg.max_steps - 1 if cfg.lr_decay else None, cfg.warmup_steps)
        log = {"step": step}

        # 1. clean rollouts, sampled from pi_old (this step's weights); with filter_dead_groups, only live groups
        #    (and the dead ones still needed to fill the batch) go on to the attack
        policy.eval()
        cuda_peak(cfg.device)  # on CUDA each phase's peak memory is logged (mem_generate, mem_attack, mem_update)
        t0 = time.time()
        records, images, prompts, clean = clean_rollouts(policy, tok, train_set, order, step, rank=rank, world=world,
                                                         cfg=cfg, compute=compute, log=log)
        # 2-4. the perturbed image for the second half of the rollouts (EgAS + TsEC, or NoisyRollout's noise)
        t1, peaks = time.time(), {"generate": cuda_peak(cfg.device)}
        adv_images, attacks = perturb_images(policy, images, clean, step=step, cfg=cfg, compute=compute, log=log)
        # 5. adversarial rollouts
        t2, peaks["attack"] = time.time(), cuda_peak(cfg.device)
        rollouts = clean
        if cfg.n_adv > 0:
            with compute():
                adv = sample(policy, tok, prompts=prompts, images=adv_images, n=cfg.n_adv,
                             max_new_tokens=cfg.max_response_len, temperature=cfg.temperature,
                             chunk_rows=cfg.rollout_chunk)
            rollouts = merge_groups(clean, adv, n_clean=cfg.n_clean, n_adv=cfg.n_adv, pad_id=tok.pad_token_id)
        t3, peaks["generate"] = time.time(), max(peaks["generate"], cuda_peak(cfg.device))

        # 6. rewards
        texts = tok.batch_decode(rollouts["response_ids"], skip_special_tokens=True)
        scores = [score(t, records[i // group], cfg) for i, t in enumerate(texts)]
        # 7. advantages, one group of n_clean + n_adv per prompt
        reward = torch.tensor([s["overall"] for s in scores])
        advantages = grpo.group_advantages(reward, group, scale=cfg.scale_rewards, batch_std=global_std(reward))
        # 8. update: every response conditioned on the clean image (or its own image, logprob_image="adversarial"),
        #    in updates_per_rollout mini-batch steps (x ppo_epochs) on the rollout batch
        policy.train()
        is_adv = torch.arange(len(texts)) % group >= cfg.n_clean
        row_images = [adv_images[i // group] if is_adv[i] and cfg.logprob_image == "adversarial" else images[i // group]
                      for i in range(len(texts))]
        sampled_on = None  # pi_old read on the image each response was sampled on (the corrected ratio)
        if cfg.adv_old_logprob == "behaviour" and cfg.n_adv > 0:
            sampled_on = [adv_images[i // group] if is_adv[i] else images[i // group] for i in range(len(texts))]
        update = ppo.update(policy, ref, optimizer, params, rollouts=rollouts, advantages=advantages,
                            row_images=row_images, cfg=cfg, world=world, compute=compute, sampled_on=sampled_on)
        skipped = 0 if update["applied"] else skipped + 1
        t4, peaks["update"] = time.time(), cuda_peak(cfg.device)

        # logging: means over every rank's responses; one line to stdout, one JSON line to metrics.jsonl
        log.update(step_metrics(rollouts, texts, scores, is_adv=is_adv, update_entropy=update["entropy"], group=group,
                                cfg=cfg))
        log.update(attack_metrics(images, adv_images, attacks, cfg))
        log.update({"lr": optimizer.param_groups[0]["lr"], **update["log"],
                    "t_generate": (t1 - t0) + (t3 - t2), "t_attack": t2 - t1, "t_update": t4 - t3})
        if cfg.device.startswith("cuda"):
            log.update({f"mem_{phase}": peak for phase, peak in peaks.items()})
        if not update["applied"]:
            log["skipped_update"] = 1
            if rank == 0:
                tqdm.write(f"warning: step {step}: update skipped, loss {update['loss']:.4g} or gradient norm "
                           f"{update['grad_norm']:.4g} is not finite ({skipped} in a row)")
        if cfg.eval_interval and step % cfg.eval_interval == 0 or step == cfg.max_steps:
            held_out = evaluate_now(step)  # the model card of the next save reports it
            log.update({f"eval_{k}": v for k, v in held_out.items() if k == "accuracy" or k.startswith("pass@")})
        unwritten = None
        if rank == 0:
            unwritten = append_line(metrics_path, log)
            if cfg.wandb_log:
                opened["wandb"].log(log, step=step)
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in log.items()))
        unwritten = from_rank0(unwritten)  # every rank stops together
        if unwritten:
            again = "continue with --resume=True" if saved is not None else "start again with --overwrite=True"
            raise SystemExit(1 if rank else f"cannot write step {step} to {metrics_path}: {unwritten}; "
                             f"{last_checkpoint(saved)}; free some space, then {again}")

        # a checkpoint every save_interval steps, at the end, and when a signal stops the run
        if skipped >= cfg.max_skipped_updates:  # the weights may be wrecked: keep the last checkpoint as it is
            raise SystemExit(1 if rank else f"stopped: {skipped} updates in a row skipped as non-finite (steps "
                             f"{step - skipped + 1}-{step}); {last_checkpoint(saved)}; lower lr (now "
                             f"{cfg.lr:g}) or raise max_skipped_updates")
        stopped_by = checkpoint.signal_on_any_rank(stop)
        if (step % cfg.save_interval == 0 or step == cfg.max_steps or stopped_by) and skipped == 0:
            reshard(policy)  # the state-dict API finds parameters by identity: they must be the sharded ones
            checkpoint.save(policy, tok, optimizer, step=step, cfg=cfg, rank=rank, world=world, held_out=held_out)
            saved = step
        if stopped_by:
            done = "checkpoint saved" if skipped == 0 else f"last update skipped, so {last_checkpoint(saved)}"
            raise SystemExit(1 if rank else f"stopped by {stopped_by} after step {step}; {done}; continue with "
                             f"--resume=True")
    if skipped:  # the final weights were not saved: this must not pass for a finished run (train.py && eval.py)
        raise SystemExit(1 if rank else f"stopped: the update of the last step ({cfg.max_steps}) was skipped as "
                         f"non-finite ({skipped} in a row), so the final weights were not saved; "
                         f"{last_checkpoint(saved)}; lower lr (now {cfg.lr:g})")

    end = held_out if held_out["step"] == cfg.max_steps else evaluate_now(cfg.max_steps)
    if rank == 0 and not start["problems"]:
        print(f"held-out greedy accuracy: {measured(end)}")
    elif rank == 0:
        print(f"held-out greedy accuracy: {start['accuracy']:.3f} before -> {end['accuracy']:.3f} after "
              f"(format {start['format']:.3f} -> {end['format']:.3f})"
              + (f"; before = step {start['step']}, where this run resumed" if resume_from else ""))
    return start, end


def start_wandb(cfg, rank):
    """Rank 0's Weights & Biases run (None on the other ranks). When it cannot start (no login, no wandb
    installed...), every rank stops with one line."""
    run, why = None, None
    if rank == 0:
        try:
            import wandb  # optional: only a run that asks for it needs it
            run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=vars(cfg),
                             dir=cfg.out_dir)
        except Exception as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    why = from_rank0(why)
    if why:
        raise SystemExit(f"--wandb_log=True, but wandb could not start: {why}; run `wandb login`, set "
                         f"WANDB_MODE=offline, or drop --wandb_log")
    return run


def append_line(path, log):
    """Append `log` as one JSON line. Returns None, or why it could not (a full disk): whatever part of the line got
    written is cut off again, so that the file never ends in a torn line."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a") as f:
            f.write(json.dumps(log) + "\n")
    except OSError as e:
        os.truncate(path, size)
        return e.strerror or str(e)
    return None


def last_checkpoint(step):
    """What is kept, in words: the checkpoint of `step` (None: no checkpoint yet)."""
    return "there is no checkpoint" if step is None else f"the last checkpoint (step {step}) is kept as it was"


def measured(held_out):
    """An evaluation in words: '0.438 (format 1.000)', with eval_samples its sampled pass@k after the format, or 'not
    measured' when it had no problem (eval_limit=0, or fewer held-out problems than ranks) rather than the nan of 0/0."""
    if not held_out["problems"]:
        return "not measured (no held-out problems)"
    sampled = "".join(f", {k} {v:.3f}" for k, v in held_out.items() if k.startswith("pass@"))  # eval_samples > 0
    return f"{held_out['accuracy']:.3f} (format {held_out['format']:.3f}{sampled})"


def build_policy(cfg, rank, world, resume_from):
    """The policy to train (from the checkpoint when resuming), a frozen reference copy when kl_coef > 0, and the
    tokenizer. Weights are fp32 (the master copy the optimizer updates); under torchrun rank 0 alone reads them
    and each rank keeps only its FSDP2 shards."""
    def load(name):
        if world == 1:
            return (*load_policy(name, device=cfg.device, seed=cfg.seed), None)
        return load_on_rank0(name, rank, cfg.seed)
    policy, tok, weights = load(resume_from or cfg.model)
    if cfg.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref, ref_weights = None, None
    if cfg.kl_coef > 0:  # a frozen copy of the initial policy
        ref, _, ref_weights = load(cfg.model)
        ref.requires_grad_(False).eval()
    if world > 1:
        for module, state in ((policy, weights), (ref, ref_weights)):
            if module is not None:
                shard(module, getattr(torch, cfg.dtype), cfg.device, state)
    return policy, ref, tok


def load_data(cfg, tok):
    """The train and held-out records; rows that would fail inside the model (bad image, empty answer, prompt
    too long...) are skipped and counted."""
    return [data.usable_records(data.load_records(cfg.dataset, split), tok, min_pixels=cfg.min_pixels,
                                max_pixels=cfg.max_pixels, max_prompt_len=cfg.max_prompt_len,
                                name=f"{cfg.dataset}/{split}", role=cfg.instruction_role)[0]
            for split in (cfg.train_split, cfg.eval_split)]


def evaluate_held_out(policy, tok, eval_set, cfg, rank, world, compute):
    """Greedy accuracy (and with eval_samples, pass@k) on the first eval_limit held-out problems, over all ranks:
    {"accuracy", "format", "pass@k"..., "problems"}, or only {"problems": 0} when there is nothing to measure.
    The samples draw from a copy of the random state: the training stream is the same whether (and how often) a run
    evaluated, so a resumed run, which evaluates where it resumes, continues the uninterrupted one exactly."""
    n = min(cfg.eval_limit, len(eval_set)) // world * world  # equal shares: ranks generate in lockstep
    if n == 0:  # eval_limit=0, or fewer problems than ranks
        return {"problems": 0}
    subset = [eval_set[i] for i in range(rank, n, world)]
    cuda = [torch.cuda.current_device()] if cfg.device.startswith("cuda") else []
    with compute(), torch.random.fork_rng(devices=cuda):
        result = evaluation.evaluate(policy, tok, subset, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                     max_new_tokens=cfg.max_response_len, batch_size=cfg.rollout_chunk or len(subset),
                                     n_samples=cfg.eval_samples, temperature=cfg.temperature,
                                     chunk_rows=cfg.rollout_chunk, role=cfg.instruction_role)
    rates = ["accuracy", "format"] + [k for k in result if k.startswith("pass@")]
    sums = all_reduce_sum(torch.tensor([result[k] * len(subset) for k in rates] + [len(subset)], dtype=torch.float64))
    return {**{k: (s / sums[-1]).item() for k, s in zip(rates, sums)}, "problems": n}


def cuda_peak(device):
    """The peak CUDA memory allocated since the last call, in GiB, and a fresh count from now; 0 off CUDA."""
    if not device.startswith("cuda"):
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def stream_records(train_set, order, step, attempt, rank, world, cfg):
    """This rank's batch_size // world records of `step`: the step's batch (attempt 0) or, with filter_dead_groups,
    the reserve batch of filtering round `attempt`. Each step owns 1 + max_filter_tries whole batches of the
    shuffled stream, used or not, so what a step draws depends on the step alone (a resumed run draws the same)."""
    per_rank, batches = cfg.batch_size // world, 1 + cfg.max_filter_tries if cfg.filter_dead_groups else 1
    first = ((step - 1) * batches + attempt) * cfg.batch_size + rank * per_rank
    return [train_set[order[(first + i) % len(order)]] for i in range(per_rank)]


def sample_clean(policy, tok, records, cfg, compute):
    """records -> (images, prompts, rollouts): each record's (3, H, W) image on cfg.device, its prompt ids, and
    n_clean responses to it sampled from pi_old (sample()'s dict, record by record)."""
    images, prompts = zip(*[data.prepare(r, tok, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                         role=cfg.instruction_role) for r in records])
    images, prompts = [x.to(cfg.device) for x in images], list(prompts)
    with compute():
        clean = sample(policy, tok, prompts=prompts, images=images, n=cfg.n_clean,
                       max_new_tokens=cfg.max_response_len, temperature=cfg.temperature,
                       chunk_rows=cfg.rollout_chunk)
    return images, prompts, clean


def clean_rollouts(policy, tok, train_set, order, step, rank, world, cfg, compute, log):
    """Step 1: this rank's batch_size // world prompts and n_clean clean rollouts of each -> (records, images,
    prompts, rollouts), as sample_clean's.

    filter_dead_groups (dynamic sampling, DAPO): prompts are taken in stream order, the step's batch first, then one
    reserve batch per extra round; a prompt whose clean rewards are all equal (a dead group: advantage 0) is
    dropped, until the batch is full or max_filter_tries rounds are spent; then the first dead groups found fill
    what is missing, so every rank keeps its share (the attack and the update run on equal shares). Every rank
    takes the same number of rounds, decided by an all-reduce: sampling is a collective under FSDP2. Logs
    filtered_groups (dead groups dropped, over all ranks) and filter_rounds."""
    records = stream_records(train_set, order, step, 0, rank, world, cfg)
    images, prompts, clean = sample_clean(policy, tok, records, cfg, compute)
    if not cfg.filter_dead_groups:
        return records, images, prompts, clean
    n, per_rank, live, dead, rounds = cfg.n_clean, len(records), [], [], 0
    while True:
        for group in zip(records, images, prompts, prompt_rows(clean, n)):
            if len(live) == per_rank:  # full: the rest of this round is not used
                break
            (dead if is_dead(group, tok, cfg) else live).append(group)
        missing = per_rank - len(live)
        if rounds == cfg.max_filter_tries or not global_sum(missing):
            break
        rounds += 1  # a rank that is already full samples its reserve too: every rank joins each round's gathers
        records = stream_records(train_set, order, step, rounds, rank, world, cfg)
        images, prompts, clean = sample_clean(policy, tok, records, cfg, compute)
    log.update(filtered_groups=int(global_sum(len(dead) - missing)), filter_rounds=rounds)
    records, images, prompts, rows = zip(*live, *dead[:missing])
    return list(records), list(images), list(prompts), cat_rollouts(rows, tok.pad_token_id)


def score(text, record, cfg):
    """rewards.score of one response to `record`: {overall, accuracy, format}, and on synthetic_score "consistent"
    (its boxed answer follows from its own counts). With reward_reading a right answer that its counts do not
    give earns no accuracy reward; "accuracy" stays the boxed answer's correctness."""
    s = rewards.score(text, record["answer"], record.get("choices"))
    if cfg.dataset == "synthetic_score":
        s["consistent"] = float(data.score_consistent(text))
        if cfg.reward_reading:
            s["overall"] = rewards.ACCURACY_WEIGHT * s["accuracy"] * s["consistent"] + rewards.FORMAT_WEIGHT * s["format"]
    return s


def is_dead(group, tok, cfg):
    """group: (record, image, prompt, its rollout rows) -> True when every response's reward is the same."""
    record, _, _, rows = group
    texts = tok.batch_decode(rows["response_ids"], skip_special_tokens=True)
    reward = torch.tensor([score(t, record, cfg)["overall"] for t in texts])
    return bool(grpo.dead_groups(reward, len(texts))[0])


def prompt_rows(rollouts, n):
    """A rollout dict of k prompts x n rows -> k dicts, prompt by prompt."""
    return [{key: v[i:i + n] for key, v in rollouts.items()} for i in range(0, len(rollouts["prompt_ids"]), n)]


def cat_rollouts(parts, pad_id):
    """Rollout dicts from different sampling calls -> one, part after part: prompts left-padded to the longest,
    responses right-padded to the longest (ids with pad_id, masks and entropies with 0)."""
    P, L = (max(p[key].shape[1] for p in parts) for key in ("prompt_ids", "response_ids"))

    def padded(key, t):
        fill = pad_id if key.endswith("_ids") else 0
        if key.startswith("prompt"):
            return torch.nn.functional.pad(t, (P - t.shape[1], 0), value=fill)
        return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=fill) if key.startswith("response") else t
    return {key: torch.cat([padded(key, p[key]) for p in parts]) for key in parts[0]}


def perturb_images(policy, images, clean, step, cfg, compute, log):
    """Steps 2-4: the image each prompt's n_adv rollouts will see, from the perturbation cfg.perturb names
    (egas.PERTURBATIONS: EgAS + TsEC, NoisyRollout's noise, none). Returns (adv_images, attacks): attacks holds
    the attack's stats per prompt (empty without an attack); what else it measured goes into `log`."""
    if cfg.n_adv == 0:
        return list(images), []
    with compute():
        adv_images, attacks, measured = egas.PERTURBATIONS[cfg.perturb][1](policy, images, clean, step=step, cfg=cfg)
    log.update(measured)
    return adv_images, attacks


def get_lr(it, lr, decay_iters, warmup_iters=0):
    """nanoGPT's schedule: linear warmup for warmup_iters, then cosine from lr down to lr / 10 at decay_iters
    (decay_iters None: constant lr after the warmup)."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if decay_iters is None:
        return lr
    return lr * (0.55 + 0.45 * math.cos(math.pi * (it - warmup_iters) / max(1, decay_iters - warmup_iters)))


def step_metrics(rollouts, texts, scores, is_adv, update_entropy, group, cfg):
    """What the step's rollouts were like, as means over every rank's responses (one named line per metric).

    rollouts: the merged batch (B rows, group by group: n_clean clean rows, then n_adv adversarial ones);
    texts, scores: per row; is_adv: (B,) bool; update_entropy: (B, L) token entropies of the update pass.
    Entropies are per-token means over each response, then over responses. `entropy_clean` and `entropy_adv` are
    the entropies of the distributions the tokens were sampled from -- the adversarial rows on the attacked image;
    `entropy_adv_on_clean` is the adversarial rows' entropy in the update, conditioned on the clean image.
    """
    mask = rollouts["response_mask"].float().cpu()
    lengths = mask.sum(1)
    per_response = lambda token_values: (token_values.float().cpu() * mask).sum(1) / lengths  # (B,)
    sampled_entropy = per_response(rollouts["response_entropy"])
    reward = torch.tensor([s["overall"] for s in scores])
    accuracy = torch.tensor([s["accuracy"] for s in scores])
    answers = [rewards.extract_answer(t) for t in texts]
    clean, adv = ~is_adv, is_adv
    m = {"reward_clean": global_mean(reward[clean]),
         "accuracy_clean": global_mean(accuracy[clean]),
         "entropy_clean": global_mean(sampled_entropy[clean]),
         "entropy": global_mean(sampled_entropy),
         "format": global_mean(torch.tensor([s["format"] for s in scores])),
         "response_len": global_mean(lengths),
         "truncated": global_mean(rollouts["truncated"].float().cpu()),
         "dead_groups": global_mean(grpo.dead_groups(reward, group).float()),
         "answer_diversity": global_mean(distinct_answers(answers, group)),  # distinct final answers per group
         "answer_diversity_clean": global_mean(distinct_answers(answers, group, cfg.n_clean, first=True))}
    if "consistent" in scores[0]:  # synthetic_score: the clean half's answers that follow from their own counts,
        m["consistent_clean"] = global_mean(torch.tensor([s["consistent"] for s in scores])[clean])
        # and the mean entropy of the clean half's count digits (per response, over responses that state any)
        digits = torch.zeros_like(mask)
        for i, t in enumerate(texts):
            if clean[i] and len(t) <= lengths[i] <= len(t) + 1:  # one token per character (+ the stop token)
                digits[i, data.score_counts(t)] = 1.0
        stated = digits.sum(1) > 0
        count_entropy = (rollouts["response_entropy"].float().cpu() * digits).sum(1)[stated] / digits.sum(1)[stated]
        if global_sum(stated.sum()):  # some rank's responses state counts (else there is no mean to log)
            m["entropy_counts_clean"] = global_mean(count_entropy)
    if cfg.n_adv > 0:
        m.update({"reward_adv": global_mean(reward[adv]),
                  "accuracy_adv": global_mean(accuracy[adv]),
                  "entropy_adv": global_mean(sampled_entropy[adv]),
                  "answer_diversity_adv": global_mean(distinct_answers(answers, group, cfg.n_adv, first=False))})
        if cfg.logprob_image == "clean":
            m["entropy_adv_on_clean"] = global_mean(per_response(update_entropy)[adv])
    return m


def attack_metrics(images, adv_images, attacks, cfg):
    """How far the second half's images moved, and what the attack did to its objective (means over prompts).

    attack_linf, attack_l2: distance of the perturbed image from the clean one in 1/255 units; attack_gain: the
    TsEC objective's rise in nats, attack_gain_rel: that rise over the objective on the clean image (over the
    prompts where that is > 0; not logged when none is).
    """
    if cfg.n_adv == 0 or cfg.perturb == "none":
        return {}
    distances = torch.tensor([egas.perturbation_size(x, x_adv) for x, x_adv in zip(images, adv_images)])  # (n, 2)
    m = {"attack_linf": global_mean(distances[:, 0]), "attack_l2": global_mean(distances[:, 1])}
    if attacks:
        gain, before = torch.tensor([a["gain"] for a in attacks]), torch.tensor([a["objective_clean"] for a in attacks])
        m["attack_gain"] = global_mean(gain)
        some = before > 0  # a band with no entropy at all (a near-zero temperature) has no relative gain, not 0 / 0
        if global_sum(some.sum()):
            m["attack_gain_rel"] = global_mean((gain / before)[some])
        m["tsec_fallback"] = int(global_sum(sum(a["fallback"] for a in attacks)))
    return m


def distinct_answers(answers, group, n=None, first=True):
    """(n_groups,) number of distinct final answers in each group of `group` rows -- or only in its first (or
    last) `n` rows: the clean half (or the adversarial half)."""
    n = n or group
    halves = [answers[g:g + n] if first else answers[g + group - n:g + group] for g in range(0, len(answers), group)]
    return torch.tensor([float(len(set(h))) for h in halves])


def check_config(cfg):
    """Every value a run depends on, checked before anything heavy loads: one line names the value and the fix."""
    choices = {"perturb": tuple(egas.PERTURBATIONS), "logprob_image": ("clean", "adversarial"),
               "attack_objective": ("bounded", "full_logits"), "adv_old_logprob": ("clean", "behaviour"),
               "scale_rewards": ("group", "batch", "none"), "instruction_role": ("user", "system"),
               "tsec_scope": ("group", "response"), "pg_tokens": ("all", "vepo", "top_entropy"),
               "cov_control": ("none", "kl_cov", "clip_cov"),
               "dtype": ("float32", "bfloat16", "float16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"config error: {key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    if cfg.reward_reading and cfg.dataset != "synthetic_score":
        raise SystemExit(f"config error: reward_reading checks a synthetic_score reading, got dataset={cfg.dataset!r}")
    if cfg.n_clean < 1 or cfg.n_adv < 0 or cfg.n_clean + cfg.n_adv < 2:
        raise SystemExit("config error: need n_clean >= 1, n_adv >= 0 and n_clean + n_adv >= 2 responses per prompt")
    configurator.check_at_least(cfg, {
        "max_steps": 1, "batch_size": 1, "micro_batch_size": 1, "save_interval": 1, "eval_interval": 0,
        "updates_per_rollout": 1, "ppo_epochs": 1, "rollout_chunk": 0, "eval_samples": 0, "max_skipped_updates": 1,
        "attack_rows": 1, "eval_limit": 0, "max_filter_tries": 0, "max_response_len": 1, "max_prompt_len": 1, "pgd_steps": 0,
        "logit_chunk": 1, "weight_decay": 0, "clip_low": 0, "clip_high": 0, "clip_dual": 0, "kl_coef": 0, "entropy_coef": 0,
        "pgd_eps": 0})
    for key in ("lr", "temperature", "grad_clip"):
        if not getattr(cfg, key) > 0:  # also catches nan
            raise SystemExit(f"config error: {key} must be > 0, got {getattr(cfg, key)}")
    if 0 < cfg.clip_dual <= 1 + cfg.clip_high:
        raise SystemExit(f"config error: clip_dual must be 0 (off) or above 1 + clip_high ({1 + cfg.clip_high:g}): it "
                         f"bounds ratios the clip leaves unbounded, got {cfg.clip_dual}")
    if cfg.clip_low >= 1:
        raise SystemExit(f"config error: clip_low must be < 1 (the ratio is clipped to [1 - clip_low, ...]), got {cfg.clip_low}")
    if not 0 < cfg.cov_ratio <= 1 or not cfg.kl_cov_coef >= 0 or len(cfg.clip_cov_bounds) != 2 \
            or not cfg.clip_cov_bounds[0] < cfg.clip_cov_bounds[1]:
        raise SystemExit(f"config error: need 0 < cov_ratio <= 1, kl_cov_coef >= 0 and clip_cov_bounds = (low, high) "
                         f"with low < high, got {cfg.cov_ratio}, {cfg.kl_cov_coef}, {cfg.clip_cov_bounds}")
    if cfg.filter_dead_groups and (cfg.n_clean < 2 or cfg.max_filter_tries < 1):
        raise SystemExit(f"config error: filter_dead_groups needs n_clean >= 2 (one clean response is always a dead "
                         f"group) and max_filter_tries >= 1 (rounds to replace them), got {cfg.n_clean} and "
                         f"{cfg.max_filter_tries}")
    if cfg.cov_control == "kl_cov" and cfg.updates_per_rollout * cfg.ppo_epochs == 1:
        raise SystemExit("config error: cov_control='kl_cov' with one update per rollout does nothing (its |log "
                         "ratio| is 0, with zero gradient): raise updates_per_rollout or ppo_epochs")
    data.check_pixel_bounds(cfg.min_pixels, cfg.max_pixels)
    check_device(cfg.device)
    if len(cfg.tsec_band) != 2 or not 0.0 <= cfg.tsec_band[0] <= cfg.tsec_band[1] <= 1.0:
        raise SystemExit(f"config error: tsec_band must be (lo, hi) with 0 <= lo <= hi <= 1, got {cfg.tsec_band}")
    data.check_dataset(cfg.dataset)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (world * cfg.updates_per_rollout):
        raise SystemExit(f"config error: batch_size {cfg.batch_size} must split into {world} rank(s) x "
                         f"{cfg.updates_per_rollout} mini-batch(es) of whole prompts (updates_per_rollout)")


def merge_groups(clean, adv, n_clean, n_adv, pad_id):
    """Interleave two rollout batches into groups: prompt i's n_clean clean rows, then its n_adv adversarial rows."""
    halves = zip(prompt_rows(clean, n_clean), prompt_rows(adv, n_adv))
    return cat_rollouts([half for pair in halves for half in pair], pad_id)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        status = 0
    except SystemExit as e:  # one line: a bad input, a stop by signal, a failed save (exit status 1)
        status = e.code
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # everything is saved and the process group is closed:
        sys.stdout.flush()                          # skip interpreter teardown, where gloo's threads can
        sys.stderr.flush()                          # abort ("terminate called without an active exception")
        os._exit(status)
    sys.exit(status)

"""SaEI: RL fine-tuning of a vision-language model with GRPO and selective-adversarial entropy intervention.

One training step (DESIGN §4):
  1. clean rollouts: n_clean responses per prompt on the image I
  2-4. EgAS + TsEC: one PGD step on I's pixels that raises the entropy of the middle-entropy tokens of
       those responses, giving I_adv (egas.py, tsec.py)
  5. adversarial rollouts: n_adv responses per prompt on I_adv
  6. rewards: 0.9 * accuracy + 0.1 * format (rewards.py)
  7. advantages: one group of n_clean + n_adv per prompt, standardized (grpo.py)
  8. update: PPO-clip on every response token, log-probs on the clean image (grpo.py)

Run: `python train.py` (the offline demo: config/demo.py), `python train.py --max_steps=20` (the demo, shorter),
`torchrun --nproc_per_node=8 train.py --model Qwen2.5-VL-3B` (the paper-family recipe below, on Geometry3K).
"""
import json
import math
import os
import sys
import time

import torch

# ----------------------------------------------------------------------------- constants
# The constants are the paper-family recipe (Geometry3K, DESIGN §4). Given neither a config file nor --model,
# train.py starts from config/demo.py instead: the offline demo on CPU.
# what to train
model = "Qwen2.5-VL-7B"      # tiny | Qwen2.5-VL-3B | Qwen2.5-VL-7B | Qwen2.5-VL-32B | hub id | local checkpoint
dataset = "geometry3k"       # geometry3k | mmk12 | synthetic | name=path (a local copy) | a local folder or .parquet
train_split = "train"        # 2,101 problems
eval_split = "test"          # 601 problems, greedy
out_dir = "out"
# NoisyRollout samples 512 prompts per step and updates on 4 mini-batches of 128 (train.py makes one update per
# rollout batch), so 128 prompts per step keep its update batch, and 246 steps are its 15 epochs of 2,101
max_steps = 246
seed = 0
batch_size = 128             # prompts per step, over all ranks
# rollouts
n_clean = 6                  # n1: responses per prompt on the clean image
n_adv = 6                    # n2: responses per prompt on the perturbed image; 0 = vanilla GRPO
temperature = 1.0
rollout_chunk = 64           # at most this many responses per generate call: bounds the KV cache (0: no limit)
max_prompt_len = 2048        # longer prompts are dropped (and counted), never truncated
max_response_len = 2048
min_pixels = 262144          # image area bounds for smart_resize (paper recipe)
max_pixels = 1000000
# SaEI
perturb = "egas"             # egas (SaEI) | noise (NoisyRollout) | none (the n_adv rollouts see the clean image)
tsec_band = (1 / 3, 2 / 3)   # entropy-rank quantiles of the tokens the attack targets; (0.0, 1.0) = no selection
tsec_scope = "group"         # rank tokens within each prompt's group of n_clean responses, or per "response"
pgd_steps = 1                # T
pgd_alpha = 2 / 255          # step size on [0, 1] pixels; negative descends the entropy (a sanity ablation)
pgd_eps = 0.0                # L-inf radius around the clean image; 0: |pgd_alpha| * pgd_steps (DESIGN §4)
logprob_image = "clean"      # image the update conditions adversarial responses on: clean | adversarial
# update
lr = 1e-6                    # no warmup
lr_decay = False             # cosine decay from lr to lr / 10 over max_steps; the papers keep lr constant
weight_decay = 1e-2
clip_low = 0.2
clip_high = 0.2
kl_coef = 0.0                # > 0 adds the low-variance KL to a frozen copy of the initial policy
entropy_coef = 0.0           # > 0 adds an entropy bonus (the released NoisyRollout scripts use 1e-3; the papers do not)
pg_tokens = "all"            # tokens that get policy gradient: all | vepo (VEPO's top 20%) | top_entropy (80/20)
grad_clip = 1.0
updates_per_rollout = 1      # optimizer steps per rollout batch, each on an equal share of its groups (PPO mini-
                             # batches): from the second on the policy is off-policy and the clip does its work
ppo_epochs = 1               # passes over the rollout batch
micro_batch_size = 4         # responses per forward/backward in the update (the attack takes one prompt's n_clean);
                             # 4 and gradient checkpointing are our memory choice for 8 x 80 GB, not the papers'
logit_chunk = 1024           # response positions per LM-head chunk (memory, DESIGN §6)
freeze_vision = True         # the paper family freezes the vision tower (gradients still reach the image)
gradient_checkpointing = True   # recompute decoder layers in backward: less memory, ~30% more compute
# evaluation, logging, checkpoints
eval_interval = 20           # greedy held-out accuracy every this many steps (0: only before and after training)
eval_limit = 1000            # held-out problems per evaluation (Geometry3K's whole test split); 0: none
eval_samples = 0             # > 0: evaluations also sample this many answers per problem and log pass@1 ... pass@k
save_interval = 50           # also on the last step and on SIGINT/SIGTERM
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
    import configurator
    if not any(a == "--model" or a.startswith("--model=") or not a.startswith("--") for a in argv):
        argv = ["config/demo.py", *argv]  # neither a config file nor a model: the offline demo
        print("no config file and no --model: running the offline demo, config/demo.py")
    cfg = configurator.get_config(DEFAULTS, argv)
    check_config(cfg)
    cfg.pgd_eps = cfg.pgd_eps or abs(cfg.pgd_alpha) * cfg.pgd_steps  # the attack budget: T steps of |alpha|
    return cfg


def main(argv):
    cfg = get_config(argv)

    import checkpoint
    import data
    import egas
    import eval as evaluation
    import grpo
    import rewards
    from model import load_policy, sample
    from tqdm import tqdm

    rank, world = setup_distributed(cfg)
    torch.manual_seed(cfg.seed + rank)  # each rank samples its own responses
    resume_from = checkpoint.start(cfg, rank, world)  # lock out_dir; the checkpoint to continue, or None
    # weights are loaded in fp32 (the master copy the optimizer updates); compute runs in cfg.dtype
    def load(name):  # under torchrun, rank 0 alone reads the weights; each rank then keeps only its shards
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
    params = [p for p in policy.parameters() if p.requires_grad]
    # frozen weights never get a gradient, so AdamW skips them; listing every parameter keeps the
    # optimizer's parameter numbering identical to the model's, which the distributed state dict needs
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    first_step = checkpoint.load(policy, optimizer, resume_from, rank) + 1 if resume_from else 1
    compute = lambda: torch.autocast(cfg.device.split(":")[0], getattr(torch, cfg.dtype),
                                     enabled=world == 1 and cfg.dtype != "float32")

    # rows that would fail inside the model (bad image, empty answer, prompt too long...) are skipped and counted
    train_set, _ = data.usable_records(data.load_records(cfg.dataset, cfg.train_split), tok, cfg.min_pixels,
                                       cfg.max_pixels, cfg.max_prompt_len, f"{cfg.dataset}/{cfg.train_split}")
    eval_set, _ = data.usable_records(data.load_records(cfg.dataset, cfg.eval_split), tok, cfg.min_pixels,
                                      cfg.max_pixels, cfg.max_prompt_len, f"{cfg.dataset}/{cfg.eval_split}")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    group = cfg.n_clean + cfg.n_adv
    per_rank = cfg.batch_size // world

    def evaluate_now():
        """Greedy accuracy (and with eval_samples, pass@k) on the first eval_limit held-out problems, all ranks."""
        n = min(cfg.eval_limit, len(eval_set)) // world * world  # equal shares: ranks generate in lockstep
        subset = [eval_set[i] for i in range(rank, n, world)]
        with compute():
            result = evaluation.evaluate(policy, tok, subset, cfg.min_pixels, cfg.max_pixels, cfg.max_response_len,
                                         n_samples=cfg.eval_samples, temperature=cfg.temperature,
                                         chunk_rows=cfg.rollout_chunk)
        rates = ["accuracy", "format"] + [k for k in result if k.startswith("pass@")]
        sums = all_reduce_sum(torch.tensor([result[k] * len(subset) for k in rates] + [len(subset)], dtype=torch.float64))
        return {**{k: (s / sums[-1]).item() for k, s in zip(rates, sums)}, "problems": n}

    stop = install_stop_handlers()
    start = held_out = dict(evaluate_now(), step=first_step - 1)
    skipped = 0  # updates skipped in a row
    if rank == 0:
        print(f"held-out greedy accuracy before training: {start['accuracy']:.3f} (format {start['format']:.3f})")
    metrics_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if rank == 0 else None
    if cfg.wandb_log and rank == 0:
        import wandb  # optional: only a run that asks for it needs it
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=vars(cfg), dir=cfg.out_dir)
    for step in tqdm(range(first_step, cfg.max_steps + 1), desc="train", disable=None if rank == 0 else True):
        first = (step - 1) * cfg.batch_size + rank * per_rank  # this rank's slice of the step's prompts
        records = [train_set[order[(first + i) % len(order)]] for i in range(per_rank)]
        for param_group in optimizer.param_groups:
            param_group["lr"] = get_lr(step - 1, cfg.lr, cfg.max_steps - 1) if cfg.lr_decay else cfg.lr
        images, prompts = zip(*[data.prepare(r, tok, cfg.min_pixels, cfg.max_pixels) for r in records])
        images = [x.to(cfg.device) for x in images]
        log = {"step": step}

        # 1. clean rollouts, sampled from pi_old (this step's weights)
        policy.eval()
        t0 = time.time()
        with compute():
            clean = sample(policy, tok, prompts, images, cfg.n_clean, cfg.max_response_len, cfg.temperature,
                           chunk_rows=cfg.rollout_chunk)

        # 2-4. the perturbed image for the second half of the rollouts
        t1 = time.time()
        adv_images, attacks = list(images), []  # attacks: one stats dict per prompt (egas.attack)
        if cfg.n_adv > 0 and cfg.perturb == "egas":
            for i, x in enumerate(images):
                rows = slice(i * cfg.n_clean, (i + 1) * cfg.n_clean)
                seqs, attn, resp_mask = sequences(clean, rows)
                with compute():
                    adv_images[i], st = egas.attack(policy, x, seqs, attn, resp_mask, clean["prompt_ids"].shape[1],
                                                    cfg.pgd_steps, cfg.pgd_alpha, cfg.pgd_eps, cfg.tsec_band,
                                                    cfg.tsec_scope, cfg.temperature, cfg.logit_chunk)
                attacks.append(st)
        elif cfg.n_adv > 0 and cfg.perturb == "noise":  # NoisyRollout: random noise, strong early, ~0 at the end
            log["noise_k"] = egas.noise_level(step, cfg.max_steps)
            adv_images = [egas.add_noise(x, log["noise_k"]) for x in images]
        # 5. adversarial rollouts
        t2 = time.time()
        rollouts = clean
        if cfg.n_adv > 0:
            with compute():
                adv = sample(policy, tok, prompts, adv_images, cfg.n_adv, cfg.max_response_len, cfg.temperature,
                             chunk_rows=cfg.rollout_chunk)
            rollouts = merge_groups(clean, adv, cfg.n_clean, cfg.n_adv, tok.pad_token_id)
        t3 = time.time()

        # 6. rewards
        texts = tok.batch_decode(rollouts["response_ids"], skip_special_tokens=True)
        scores = [rewards.score(t, records[i // group]["answer"], records[i // group].get("choices"))
                  for i, t in enumerate(texts)]
        reward = torch.tensor([s["overall"] for s in scores])
        # 7. advantages, one group of n_clean + n_adv per prompt
        advantages = grpo.group_advantages(reward, group)

        # 8. update: every response conditioned on the clean image (or its own image, logprob_image="adversarial"),
        #    in updates_per_rollout mini-batch steps (x ppo_epochs) on the rollout batch
        policy.train()
        is_adv = torch.arange(len(texts)) % group >= cfg.n_clean
        row_images = [adv_images[i // group] if is_adv[i] and cfg.logprob_image == "adversarial" else images[i // group]
                      for i in range(len(texts))]
        update = ppo_update(policy, ref, optimizer, params, rollouts, advantages, row_images, cfg, world, compute)
        skipped = 0 if update["applied"] else skipped + 1
        if not update["applied"]:
            log["skipped_update"] = 1
            if rank == 0:
                tqdm.write(f"warning: step {step}: update skipped, loss {update['loss']:.4g} or gradient norm "
                           f"{update['grad_norm']:.4g} is not finite ({skipped} in a row)")
        t4 = time.time()

        # logging: means over every rank's responses; one line to stdout, one JSON line to metrics.jsonl
        log.update(step_metrics(rollouts, texts, scores, is_adv, update["entropy"], group, cfg))
        log.update(attack_metrics(images, adv_images, attacks, cfg))
        log.update({"lr": optimizer.param_groups[0]["lr"], **update["log"],
                    "t_generate": (t1 - t0) + (t3 - t2), "t_attack": t2 - t1, "t_update": t4 - t3})
        if cfg.pg_tokens == "vepo":  # mean clean-vs-noised JSD per token
            log["vepo_jsd"] = update["jsd"] / global_sum(rollouts["response_mask"].sum())
        if cfg.eval_interval and step % cfg.eval_interval == 0 or step == cfg.max_steps:
            held_out = dict(evaluate_now(), step=step)  # the model card of the next save reports it
            log["eval_accuracy"] = held_out["accuracy"]
            log.update({f"eval_{k}": v for k, v in held_out.items() if k.startswith("pass@")})
        if rank == 0:
            metrics_file.write(json.dumps(log) + "\n")
            metrics_file.flush()
            if cfg.wandb_log:
                wandb.log(log, step=step)
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in log.items()))
        if skipped >= cfg.max_skipped_updates:  # the weights may be wrecked: keep the last checkpoint as it is
            stop["restore"]()
            checkpoint.unlock()
            raise SystemExit(1 if rank else f"stopped: {skipped} updates in a row skipped as non-finite (steps "
                             f"{step - skipped + 1}-{step}); the last checkpoint is kept as it was; lower lr (now "
                             f"{cfg.lr:g}) or raise max_skipped_updates")
        # which signal any rank got: one count per signal, summed over ranks
        signals = all_reduce_sum(torch.tensor([float(stop["signal"] == name) for name in STOP_SIGNALS]))
        stopped_by = next((name for name, n in zip(STOP_SIGNALS, signals.tolist()) if n > 0), None)
        if (step % cfg.save_interval == 0 or step == cfg.max_steps or stopped_by) and skipped == 0:
            reshard(policy)  # the state-dict API finds parameters by identity: they must be the sharded ones
            checkpoint.save(policy, tok, optimizer, step, cfg, rank, world, held_out)
        if stopped_by:
            stop["restore"]()
            if world > 1:
                leave_process_group()
            checkpoint.unlock()
            saved = "checkpoint saved" if skipped == 0 else "last update skipped, so the checkpoint was left as it was"
            raise SystemExit(1 if rank else f"stopped by {stopped_by} after step {step}; {saved}; continue with "
                             f"--resume=True")

    stop["restore"]()
    end = held_out if held_out["step"] == cfg.max_steps else evaluate_now()
    if rank == 0:
        print(f"held-out greedy accuracy: {start['accuracy']:.3f} before -> {end['accuracy']:.3f} after "
              f"(format {start['format']:.3f} -> {end['format']:.3f})")
    if cfg.wandb_log and rank == 0:
        wandb.finish()
    if world > 1:
        leave_process_group()
    checkpoint.unlock()
    return start, end


def get_lr(it, lr, decay_iters, warmup_iters=0):
    """nanoGPT's schedule: linear warmup for warmup_iters, then cosine from lr down to lr / 10 at decay_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    return lr * (0.55 + 0.45 * math.cos(math.pi * (it - warmup_iters) / max(1, decay_iters - warmup_iters)))


def ppo_update(policy, ref, optimizer, params, rollouts, advantages, row_images, cfg, world, compute):
    """Step 8: updates_per_rollout optimizer steps (x ppo_epochs) on the rollout batch, each on an equal share
    of every rank's groups (whole groups: a group's advantages were standardised together).

    With a single update the sampling policy is the current one, so logp_old = logp.detach() exactly; otherwise
    the sampling policy's log-probs come from one no-grad pass before the first step. Returns {"applied": every
    step was applied, "loss", "grad_norm" (means over steps), "entropy": (B, L) token entropies of the first
    epoch, "jsd": VEPO's summed JSD, "log": the update's metrics}.
    """
    B = rollouts["response_ids"].shape[0]
    n_steps = cfg.updates_per_rollout * cfg.ppo_epochs
    old_logp = rollout_logprobs(policy, rollouts, row_images, cfg, compute) if n_steps > 1 else None
    rows_per_update = B // cfg.updates_per_rollout  # check_config: a whole number of groups
    entropy = torch.zeros(rollouts["response_mask"].shape)
    sums = {"loss": 0.0, "grad_norm": 0.0, "clipped_tokens": 0.0, "tokens": 0.0, "ratio_sum": 0.0, "kl": 0.0,
            "approx_kl": 0.0, "pg_entropy": 0.0, "jsd": 0.0}
    ratio_min, ratio_max, applied = math.inf, -math.inf, True
    for epoch in range(cfg.ppo_epochs):
        for first in range(0, B, rows_per_update):
            rows = slice(first, first + rows_per_update)
            part = {k: v[rows] for k, v in rollouts.items()}
            totals, part_entropy = policy_update(policy, ref, part, advantages[rows], row_images[rows], cfg, world,
                                                 compute, None if old_logp is None else old_logp[rows])
            loss = global_sum(totals["loss"])
            grad_norm, ok = optimizer_step(optimizer, params, cfg.grad_clip, loss)
            applied = applied and ok
            if epoch == 0:
                entropy[rows, :part_entropy.shape[1]] = part_entropy
            sums["loss"] += loss
            sums["grad_norm"] += grad_norm
            sums["tokens"] += totals["tokens"]  # already summed over ranks
            for key in ("clipped_tokens", "ratio_sum", "approx_kl", "pg_entropy", "jsd", "kl"):
                sums[key] += global_sum(totals[key])
            ratio_min = min(ratio_min, -all_reduce_max(torch.tensor(-totals["ratio_min"])).item())
            ratio_max = max(ratio_max, all_reduce_max(torch.tensor(totals["ratio_max"])).item())
    log = {"loss": sums["loss"] / n_steps, "grad_norm": sums["grad_norm"] / n_steps,
           "clip_frac": sums["clipped_tokens"] / sums["tokens"], "ratio_mean": sums["ratio_sum"] / sums["tokens"],
           "ratio_min": ratio_min, "ratio_max": ratio_max, "approx_kl": sums["approx_kl"] / sums["tokens"]}
    if cfg.pg_tokens != "all":  # entropy of the tokens that got gradient
        log["pg_entropy"] = sums["pg_entropy"] / sums["tokens"]
    if ref is not None:
        log["kl"] = sums["kl"] / n_steps
    return {"applied": applied, "loss": log["loss"], "grad_norm": log["grad_norm"], "entropy": entropy,
            "jsd": sums["jsd"], "log": log}


def micro_batches(rollouts, row_images, cfg):
    """The update's micro-batches: at most micro_batch_size rows of one group that share one image, each cut to
    its prompt's own left padding and its longest response (same result, the cost of its own tokens).

    Yields (rows, ids, attention_mask, prompt_len, targets, mask, pixel_values, grid): ids/attention_mask (m, p + w),
    targets/mask (m, w) with w the micro-batch's longest response; pixel_values/grid of its one image.
    """
    import data
    seqs, attn, resp_mask = sequences(rollouts, slice(None))
    prompt_len = rollouts["prompt_ids"].shape[1]
    group = cfg.n_clean + cfg.n_adv
    starts = []  # first row of each micro-batch
    for r in range(seqs.shape[0]):
        if (not starts or r - starts[-1] == cfg.micro_batch_size or r // group != starts[-1] // group
                or row_images[r] is not row_images[starts[-1]]):
            starts.append(r)
    for first, end in zip(starts, starts[1:] + [seqs.shape[0]]):
        rows = slice(first, end)
        pad = int((attn[first, :prompt_len] == 0).sum())
        width = max(1, int(resp_mask[rows].sum(1).max()))
        pixel_values, grid = data.batch_pixels(row_images[first:first + 1])
        yield (rows, seqs[rows, pad:prompt_len + width], attn[rows, pad:prompt_len + width], prompt_len - pad,
               rollouts["response_ids"][rows, :width], resp_mask[rows, :width], pixel_values, grid)


@torch.no_grad()
def rollout_logprobs(policy, rollouts, row_images, cfg, compute):
    """(B, L) log-prob of every response token under the current weights: pi_old, before the first update."""
    from model import shared_prompt_hidden, token_logprobs
    logp = torch.zeros(rollouts["response_mask"].shape)
    for rows, ids, am, p_len, targets, mask, pixel_values, grid in micro_batches(rollouts, row_images, cfg):
        with compute():
            hidden = shared_prompt_hidden(policy, ids, am, pixel_values, grid, p_len)
            logp[rows, :mask.shape[1]] = token_logprobs(hidden, policy.lm_head, targets, mask, cfg.temperature,
                                                        cfg.logit_chunk)[0].cpu()
    return logp


def policy_update(policy, ref, rollouts, advantages, row_images, cfg, world, compute, old_logp=None):
    """The clipped-objective loss of one (mini-)batch, micro-batch by micro-batch, into .grad.

    rollouts: prompt_ids/prompt_mask (B, P), response_ids/response_mask (B, L); advantages: (B,); row_images:
    B (3, H, W) images the log-probs condition on; old_logp: (B, L) the sampling policy's log-probs, or None when
    it is the current policy (then logp_old = logp.detach()). The loss is the token-mean over every response token
    of every rank (or over the cfg.pg_tokens selection), so the gradient does not depend on micro-batching or on
    the number of ranks. Returns (totals, entropy): summed loss/kl/clip/ratio statistics and (B, L) entropies.
    """
    import grpo
    import vepo
    from model import shared_prompt_hidden, token_logprobs
    resp_mask = rollouts["response_mask"]
    n_tokens = all_reduce_sum(resp_mask.sum().float().cpu()).item()  # token-mean over every rank's tokens
    # the policy loss averages over the tokens that get gradient (pg_tokens): each response's top 20% is a
    # count fixed by its length, so the denominator is known before any forward pass
    n_pg = n_tokens if cfg.pg_tokens == "all" else all_reduce_sum(vepo.n_top(resp_mask).sum().float().cpu()).item()
    totals = {"loss": 0.0, "clipped_tokens": 0.0, "kl": 0.0, "tokens": n_pg, "pg_entropy": 0.0, "jsd": 0.0,
              "ratio_sum": 0.0, "approx_kl": 0.0, "ratio_min": math.inf, "ratio_max": -math.inf}
    entropy = torch.zeros(resp_mask.shape)
    # A micro-batch never mixes two prompts or two images, so it encodes its prompt and image once and shares
    # their keys/values among its rows: P + m * L tokens instead of m * (P + L).
    for rows, ids, am, p_len, targets, mask, pixel_values, grid in micro_batches(rollouts, row_images, cfg):
        width = mask.shape[1]
        with compute():
            hidden = shared_prompt_hidden(policy, ids, am, pixel_values, grid, p_len)
            logp, ent = token_logprobs(hidden, policy.lm_head, targets, mask, cfg.temperature, cfg.logit_chunk)
            pg_mask = mask  # the tokens that get policy gradient
            if cfg.pg_tokens == "vepo":  # a second pass with the image drowned in noise: which tokens does it drive?
                with torch.no_grad():
                    noisy = shared_prompt_hidden(policy, ids, am, vepo.perturb_pixels(pixel_values), grid, p_len)
                    jsd, ent_noisy = vepo.token_jsd(hidden.detach(), noisy, policy.lm_head.weight, mask,
                                                    cfg.temperature, cfg.logit_chunk)
                pg_mask = vepo.top_fraction(vepo.score(jsd, ent.detach(), ent_noisy - ent.detach(), mask), mask)
                totals["jsd"] += jsd.sum().item()
            elif cfg.pg_tokens == "top_entropy":
                pg_mask = vepo.top_fraction(ent, mask)
            old = logp.detach() if old_logp is None else old_logp[rows, :width].to(logp.device)
            loss, st = grpo.policy_loss(logp, old, advantages[rows].to(logp.device), pg_mask, cfg.clip_low,
                                        cfg.clip_high, n_pg)
            if ref is not None:
                with torch.no_grad():
                    ref_hidden = shared_prompt_hidden(ref, ids, am, pixel_values, grid, p_len)
                    ref_logp, _ = token_logprobs(ref_hidden, ref.lm_head, targets, mask, cfg.temperature,
                                                 cfg.logit_chunk)
                kl = (grpo.kl_penalty(logp, ref_logp) * mask).sum() / n_tokens
                loss = loss + cfg.kl_coef * kl
                totals["kl"] += kl.item()
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * (ent * mask).sum() / n_tokens
        (loss * world).backward()  # FSDP averages gradients over ranks; the loss is already a global mean
        totals["loss"] += loss.item()
        for key in ("clipped_tokens", "ratio_sum", "approx_kl"):
            totals[key] += st[key]
        totals["ratio_min"], totals["ratio_max"] = min(totals["ratio_min"], st["ratio_min"]), max(totals["ratio_max"], st["ratio_max"])
        totals["pg_entropy"] += (ent.detach() * pg_mask).sum().item()
        entropy[rows, :width] = ent.detach().cpu()
    return totals, entropy


def optimizer_step(optimizer, params, grad_clip, loss):
    """Clip the gradient norm and step, unless the loss or the norm is not finite: such an update is dropped
    (the weights stay as they were), never applied. Clears the gradients. Returns (grad_norm, applied)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    applied = math.isfinite(grad_norm) and math.isfinite(loss)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied


def step_metrics(rollouts, texts, scores, is_adv, update_entropy, group, cfg):
    """What the step's rollouts were like, as means over every rank's responses (one named line per metric).

    rollouts: the merged batch (B rows, group by group: n_clean clean rows, then n_adv adversarial ones);
    texts, scores: per row; is_adv: (B,) bool; update_entropy: (B, L) token entropies of the update pass.
    Entropies are per-token means over each response, then over responses. `entropy_clean` and `entropy_adv` are
    the entropies of the distributions the tokens were sampled from -- the adversarial rows on the attacked image;
    `entropy_adv_on_clean` is the adversarial rows' entropy in the update, conditioned on the clean image.
    """
    import grpo
    import rewards
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
    TsEC objective's rise in nats, attack_gain_rel: that rise over the objective on the clean image.
    """
    import egas
    if cfg.n_adv == 0 or cfg.perturb == "none":
        return {}
    distances = torch.tensor([egas.perturbation_size(x, x_adv) for x, x_adv in zip(images, adv_images)])  # (n, 2)
    m = {"attack_linf": global_mean(distances[:, 0]), "attack_l2": global_mean(distances[:, 1])}
    if attacks:
        gain = torch.tensor([a["gain"] for a in attacks])
        m.update({"attack_gain": global_mean(gain),
                  "attack_gain_rel": global_mean(gain / torch.tensor([a["objective_clean"] for a in attacks])),
                  "tsec_fallback": int(global_sum(sum(a["fallback"] for a in attacks)))})
    return m


def distinct_answers(answers, group, n=None, first=True):
    """(n_groups,) number of distinct final answers in each group of `group` rows -- or only in its first (or
    last) `n` rows: the clean half (or the adversarial half)."""
    n = n or group
    halves = [answers[g:g + n] if first else answers[g + group - n:g + group] for g in range(0, len(answers), group)]
    return torch.tensor([float(len(set(h))) for h in halves])


def global_mean(values):
    """Mean of a 1-D tensor over every rank's entries."""
    total, count = all_reduce_sum(torch.tensor([values.double().sum().item(), float(values.numel())])).tolist()
    return total / count


def global_sum(value):
    """A number summed over ranks."""
    return all_reduce_sum(torch.tensor(float(value))).item()


def check_config(cfg):
    """Every value a run depends on, checked before anything heavy loads: one line names the value and the fix."""
    choices = {"perturb": ("egas", "noise", "none"), "logprob_image": ("clean", "adversarial"),
               "tsec_scope": ("group", "response"), "pg_tokens": ("all", "vepo", "top_entropy"),
               "dtype": ("float32", "bfloat16", "float16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"config error: {key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    if cfg.n_clean < 1 or cfg.n_adv < 0 or cfg.n_clean + cfg.n_adv < 2:
        raise SystemExit("config error: need n_clean >= 1, n_adv >= 0 and n_clean + n_adv >= 2 responses per prompt")
    at_least = {"max_steps": 1, "batch_size": 1, "micro_batch_size": 1, "save_interval": 1, "eval_interval": 0,
                "updates_per_rollout": 1, "ppo_epochs": 1, "rollout_chunk": 0, "eval_samples": 0,
                "max_skipped_updates": 1,
                "eval_limit": 0, "max_response_len": 1, "max_prompt_len": 1, "min_pixels": 1, "pgd_steps": 0,
                "logit_chunk": 1}
    for key, low in at_least.items():
        if getattr(cfg, key) < low:
            raise SystemExit(f"config error: {key} must be >= {low}, got {getattr(cfg, key)}")
    positive = ("lr", "temperature", "grad_clip")
    for key in positive:
        if not getattr(cfg, key) > 0:  # also catches nan
            raise SystemExit(f"config error: {key} must be > 0, got {getattr(cfg, key)}")
    for key in ("weight_decay", "clip_low", "clip_high", "kl_coef", "entropy_coef", "pgd_eps"):
        if not getattr(cfg, key) >= 0:
            raise SystemExit(f"config error: {key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.clip_low >= 1:
        raise SystemExit(f"config error: clip_low must be < 1 (the ratio is clipped to [1 - clip_low, ...]), got {cfg.clip_low}")
    if cfg.max_pixels < cfg.min_pixels:
        raise SystemExit(f"config error: max_pixels ({cfg.max_pixels}) must be >= min_pixels ({cfg.min_pixels})")
    if len(cfg.tsec_band) != 2 or not 0.0 <= cfg.tsec_band[0] <= cfg.tsec_band[1] <= 1.0:
        raise SystemExit(f"config error: tsec_band must be (lo, hi) with 0 <= lo <= hi <= 1, got {cfg.tsec_band}")
    import data
    data.check_dataset(cfg.dataset)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (world * cfg.updates_per_rollout):
        raise SystemExit(f"config error: batch_size {cfg.batch_size} must split into {world} rank(s) x "
                         f"{cfg.updates_per_rollout} mini-batch(es) of whole prompts (updates_per_rollout)")


def sequences(rollouts, rows):
    """Prompt + response rows -> (input_ids, attention_mask) of shape (B, P + L) and the (B, L) response mask."""
    ids = torch.cat([rollouts["prompt_ids"][rows], rollouts["response_ids"][rows]], 1)
    attn = torch.cat([rollouts["prompt_mask"][rows], rollouts["response_mask"][rows]], 1)
    return ids, attn, rollouts["response_mask"][rows]


def merge_groups(clean, adv, n_clean, n_adv, pad_id):
    """Interleave two rollout batches into groups: prompt i's n_clean clean rows, then its n_adv adversarial rows."""
    L = max(clean["response_ids"].shape[1], adv["response_ids"].shape[1])
    n_prompts = clean["prompt_ids"].shape[0] // n_clean
    merged = {}
    for key in clean:
        a, b = clean[key], adv[key]
        if key.startswith("response"):
            fill = pad_id if key == "response_ids" else 0
            a = torch.nn.functional.pad(a, (0, L - a.shape[1]), value=fill)
            b = torch.nn.functional.pad(b, (0, L - b.shape[1]), value=fill)
        a, b = a.view(n_prompts, n_clean, *a.shape[1:]), b.view(n_prompts, n_adv, *b.shape[1:])
        merged[key] = torch.cat([a, b], 1).flatten(0, 1)
    return merged


# ----------------------------------------------------------------------------- scale-out and checkpoints

def setup_distributed(cfg):
    """Under torchrun: join the process group and pick this rank's device. Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    # A collective's tensor must live on a device its backend serves. NCCL serves CUDA tensors only, while metrics,
    # token counts and gathered objects are CPU tensors: the GPU process group pairs NCCL with gloo for those (a few
    # scalars a step), so no call site has to copy its tensor to the GPU and back, and none can forget to.
    backend = "cpu:gloo,cuda:nccl" if cfg.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    return dist.get_rank(), world


def leave_process_group():
    """Every rank waits for the others before tearing down; a rank leaving early can abort its peer in gloo."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum a tensor over ranks (a no-op in a single process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t):
    """Elementwise maximum of a tensor over ranks (a no-op in a single process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def load_on_rank0(name, rank, seed):
    """Rank 0 reads the model (load_policy, on the CPU); the other ranks build the same architecture on the meta
    device, which holds no memory. Returns (model, tokenizer, weights): weights is rank 0's {name: tensor} of every
    parameter and buffer (None elsewhere), for `shard` to hand out. One full copy in host memory per node, not one
    per rank (7B: 33 GB each). A load error on rank 0 stops every rank with its one line."""
    import torch.distributed as dist
    from model import Qwen2_5_VLForConditionalGeneration, load_policy
    shared = [None, None, None]  # tokenizer, config, error
    if rank == 0:
        try:
            model, tok = load_policy(name, seed=seed)
            shared[:2] = tok, model.config
        except SystemExit as e:
            shared[2] = str(e)
    dist.broadcast_object_list(shared, src=0)
    tok, config, error = shared
    if error:
        raise SystemExit(error)
    if rank != 0:
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
        return model, tok, None
    weights = dict(model.named_buffers())  # buffers too: rotary frequencies are not in the state dict
    weights.update(model.state_dict())
    return model, tok, weights


def shard(policy, compute_dtype, device="cpu", weights=None):
    """FSDP2: one shard group per vision block and per decoder layer, the rest (embeddings, LM head) at the root.

    Weights stay fp32 shards (the optimizer's master copy); each forward gathers them in compute_dtype.
    With `weights` from load_on_rank0 (the model on the meta device on ranks other than 0), the shards are
    allocated on `device` and filled from rank 0, one tensor at a time; without, the model's own weights are sharded.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in policy.model.visual.blocks:
        fully_shard(block, mp_policy=mp)
    for layer in policy.model.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    if weights is not None or any(p.is_meta for p in policy.parameters()):
        policy.to_empty(device=device)  # every rank alike: rank 0's values come back from `weights` below
        keys = set(policy.state_dict()) if weights is not None else set()
        set_model_state_dict(policy, {k: v for k, v in (weights or {}).items() if k in keys},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, buffer in policy.named_buffers():  # replicated, not sharded: rank 0's copy for everyone
            if weights is not None:
                buffer.copy_(weights[name])
            dist.broadcast(buffer, src=0)
    # FSDP wants the root's forward first; generate() would reach the vision blocks before it
    with torch.no_grad():
        device = next(policy.parameters()).device
        ids = torch.full((1, 4), policy.config.image_token_id, device=device)  # 16 patches = 4 merged tokens
        policy(input_ids=ids, pixel_values=torch.zeros(16, 1176, device=device),
               image_grid_thw=torch.tensor([[1, 4, 4]], device=device), use_cache=False, logits_to_keep=1)
    reshard(policy)  # the root keeps its weights gathered after a forward; the optimizer must see the shards


def reshard(policy):
    """Put every FSDP2 group back to its sharded parameters (the objects the optimizer and state dicts know)."""
    from torch.distributed.fsdp import FSDPModule
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


STOP_SIGNALS = ("SIGINT", "SIGTERM")


def install_stop_handlers():
    """SIGINT/SIGTERM finish the current step, save a checkpoint and stop, instead of dying mid-write."""
    import signal
    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
    previous = {sig: signal.signal(sig, handler) for sig in (getattr(signal, name) for name in STOP_SIGNALS)}
    stop["restore"] = lambda: [signal.signal(sig, h) for sig, h in previous.items()]
    return stop


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        status = 0
    except SystemExit as e:  # one line: a bad input, a stop by signal, a failed save (exit status 1)
        status = e.code
    import checkpoint
    checkpoint.unlock()
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # everything is saved and the process group is closed:
        sys.stdout.flush()                          # skip interpreter teardown, where gloo's threads can
        sys.stderr.flush()                          # abort ("terminate called without an active exception")
        os._exit(status)
    sys.exit(status)

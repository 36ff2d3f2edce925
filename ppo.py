"""How one rollout batch updates the policy (step 8): PPO-clip mini-batch steps, micro-batch by micro-batch.

The rollout batch (every prompt's group of n_clean + n_adv responses) is split into `updates_per_rollout`
mini-batches of whole groups, one optimizer step each (times `ppo_epochs`). The first step is on-policy; from the
second on, the policy has moved, the ratio to the sampling policy pi_old leaves 1 and the clip of grpo.policy_loss
binds. Each mini-batch's loss is the token-mean over all its tokens on every rank, accumulated micro-batch by
micro-batch (a micro-batch: rows of one prompt and one image, whose encoding they share).
"""
import math

import torch

import data
import grpo
import vepo
from distributed import all_reduce_max, all_reduce_sum, global_sum
from model import shared_prompt_hidden, token_logprobs, trimmed_sequences


def update(policy, ref, optimizer, params, rollouts, advantages, row_images, cfg, world, compute, sampled_on=None):
    """updates_per_rollout optimizer steps (x ppo_epochs) on the rollout batch, each on an equal share
    of every rank's groups (whole groups: a group's advantages were standardised together).

    pi_old, the policy that sampled: with a single update and the responses conditioned on the images they were
    sampled on, it is the current policy, so logp_old = logp.detach() exactly; otherwise its log-probs come from
    one no-grad pass before the first step. `sampled_on` (B images, or None): the image each response was sampled
    on, when pi_old must be read there (adv_old_logprob="behaviour": the adversarial half was sampled on I_adv but
    is trained on I, so its ratio is pi(o|I) / pi_old(o|I_adv)). Returns {"applied": every step was applied,
    "loss", "grad_norm" (means over steps), "entropy": (B, L) token entropies of the first epoch, "jsd": VEPO's
    summed JSD, "log": the update's metrics, the adversarial half's ratio and clip statistics apart}.
    """
    B = rollouts["response_ids"].shape[0]
    n_steps = cfg.updates_per_rollout * cfg.ppo_epochs
    old_logp = (rollout_logprobs(policy, rollouts, sampled_on, cfg, compute) if sampled_on is not None else
                rollout_logprobs(policy, rollouts, row_images, cfg, compute) if n_steps > 1 else None)
    rows_per_update = B // cfg.updates_per_rollout  # check_config: a whole number of groups
    entropy = torch.zeros(rollouts["response_mask"].shape)
    sums = {"loss": 0.0, "grad_norm": 0.0, "clipped_tokens": 0.0, "tokens": 0.0, "ratio_sum": 0.0, "kl": 0.0,
            "approx_kl": 0.0, "pg_entropy": 0.0, "jsd": 0.0, "clipped_tokens_adv": 0.0, "tokens_adv": 0.0,
            "ratio_sum_adv": 0.0, "cov_tokens": 0.0}
    ratio_min, ratio_max, applied = {"": math.inf, "_adv": math.inf}, {"": -math.inf, "_adv": -math.inf}, True
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
            for key in ("clipped_tokens", "ratio_sum", "approx_kl", "pg_entropy", "jsd", "kl", "clipped_tokens_adv",
                        "tokens_adv", "ratio_sum_adv", "cov_tokens"):
                sums[key] += global_sum(totals[key])
            for half in ratio_min:
                ratio_min[half] = min(ratio_min[half], -all_reduce_max(torch.tensor(-totals["ratio_min" + half])).item())
                ratio_max[half] = max(ratio_max[half], all_reduce_max(torch.tensor(totals["ratio_max" + half])).item())
    log = {"loss": sums["loss"] / n_steps, "grad_norm": sums["grad_norm"] / n_steps,
           "clip_frac": sums["clipped_tokens"] / sums["tokens"], "ratio_mean": sums["ratio_sum"] / sums["tokens"],
           "ratio_min": ratio_min[""], "ratio_max": ratio_max[""], "approx_kl": sums["approx_kl"] / sums["tokens"]}
    if sums["tokens_adv"]:  # the adversarial half alone: how far its behaviour policy is from the one trained
        log.update({"clip_frac_adv": sums["clipped_tokens_adv"] / sums["tokens_adv"],
                    "ratio_mean_adv": sums["ratio_sum_adv"] / sums["tokens_adv"],
                    "ratio_min_adv": ratio_min["_adv"], "ratio_max_adv": ratio_max["_adv"]})
    if cfg.cov_control != "none":  # the fraction of tokens KL-Cov penalised or Clip-Cov cut
        log["cov_frac"] = sums["cov_tokens"] / sums["tokens"]
    if cfg.pg_tokens != "all":  # entropy of the tokens that got gradient
        log["pg_entropy"] = sums["pg_entropy"] / sums["tokens"]
    if cfg.pg_tokens == "vepo":  # mean clean-vs-noised JSD per response token (first epoch)
        log["vepo_jsd"] = sums["jsd"] / cfg.ppo_epochs / global_sum(rollouts["response_mask"].sum())
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
    B = rollouts["response_ids"].shape[0]
    group = cfg.n_clean + cfg.n_adv
    starts = []  # first row of each micro-batch
    for r in range(B):
        if (not starts or r - starts[-1] == cfg.micro_batch_size or r // group != starts[-1] // group
                or row_images[r] is not row_images[starts[-1]]):
            starts.append(r)
    for first, end in zip(starts, starts[1:] + [B]):
        rows = slice(first, end)
        ids, attn, mask, prompt_len = trimmed_sequences(rollouts, rows)
        pixel_values, grid = data.batch_pixels(row_images[first:first + 1])
        yield rows, ids, attn, prompt_len, rollouts["response_ids"][rows, :mask.shape[1]], mask, pixel_values, grid


@torch.no_grad()
def rollout_logprobs(policy, rollouts, row_images, cfg, compute):
    """(B, L) log-prob of every response token under the current weights: pi_old, before the first update."""
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
    resp_mask = rollouts["response_mask"]
    keep = torch.ones(resp_mask.shape[0], 1, dtype=resp_mask.dtype, device=resp_mask.device)  # rows with gradient
    if cfg.mask_truncated_completions:
        keep = (~rollouts["truncated"])[:, None].to(resp_mask.dtype)
    # token-mean over every rank's tokens (at least one: a batch of truncated rows alone gives a zero loss)
    n_tokens = max(1.0, all_reduce_sum((resp_mask * keep).sum().float().cpu()).item())
    # the policy loss averages over the tokens that get gradient (pg_tokens): each response's top 20% is a
    # count fixed by its length, so the denominator is known before any forward pass
    n_pg = n_tokens if cfg.pg_tokens == "all" else max(1.0, all_reduce_sum(
        (vepo.n_top(resp_mask) * keep[:, 0]).sum().float().cpu()).item())
    totals = {"loss": 0.0, "clipped_tokens": 0.0, "kl": 0.0, "tokens": n_pg, "pg_entropy": 0.0, "jsd": 0.0,
              "ratio_sum": 0.0, "approx_kl": 0.0, "ratio_min": math.inf, "ratio_max": -math.inf,
              "clipped_tokens_adv": 0.0, "tokens_adv": 0.0, "ratio_sum_adv": 0.0, "ratio_min_adv": math.inf,
              "ratio_max_adv": -math.inf, "cov_tokens": 0.0}
    group = cfg.n_clean + cfg.n_adv  # rows come group by group: n_clean clean rows, then n_adv adversarial ones
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
            pg_mask, mask = pg_mask * keep[rows], mask * keep[rows]  # (mask_truncated_completions)
            old = logp.detach() if old_logp is None else old_logp[rows, :width].to(logp.device)
            loss, st = grpo.policy_loss(logp, old, advantages[rows].to(logp.device), pg_mask, cfg.clip_low,
                                        cfg.clip_high, n_pg, cfg.clip_dual, cfg.cov_control, cfg.cov_ratio,
                                        cfg.kl_cov_coef, cfg.clip_cov_bounds)
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
        is_adv = (torch.arange(rows.start, rows.stop, device=mask.device) % group >= cfg.n_clean)[:, None]
        st_adv = grpo.clip_stats(logp, old, advantages[rows].to(logp.device), pg_mask * is_adv, cfg.clip_low,
                                 cfg.clip_high, cfg.clip_dual, clip=cfg.cov_control != "kl_cov")  # adversarial rows
        for half, s in (("", st), ("_adv", st_adv)):
            for key in ("clipped_tokens", "ratio_sum"):
                totals[key + half] += s[key]
            totals["ratio_min" + half] = min(totals["ratio_min" + half], s["ratio_min"])
            totals["ratio_max" + half] = max(totals["ratio_max" + half], s["ratio_max"])
        totals["approx_kl"] += st["approx_kl"]
        totals["cov_tokens"] += st["cov_tokens"]
        totals["tokens_adv"] += st_adv["tokens"]
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

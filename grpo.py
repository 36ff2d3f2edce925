"""How the policy learns: GRPO's group-normalized advantages, the clipped objective, KL, and the covariance-based
entropy controls (KL-Cov, Clip-Cov) that act on the same objective.

Each prompt gets a group of sampled responses; a response's advantage is its reward standardized within
its group, so no value network is needed. The policy then takes a PPO-clip step on every response token.
"""
import math

import torch


def group_advantages(rewards, group_size, eps=1e-6, scale="group", batch_std=None):
    """Rewards (n_prompts * group_size,), laid out group by group -> advantages of the same shape.

    A = (r - mean) / (std + eps), the mean within each group, the unbiased std within each group (scale "group",
    GRPO), over the whole batch ("batch": `batch_std`, every rank's rewards, else these rewards'), or no division
    at all ("none", Dr. GRPO: r - mean). A group whose rewards are all equal (a "dead group": nothing to learn
    from) gets A = 0 exactly.
    """
    if group_size < 2:
        raise ValueError("group advantages need at least 2 responses per prompt (n_clean + n_adv >= 2)")
    r = rewards.view(-1, group_size)
    centered = r - r.mean(1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / ((rewards.std() if batch_std is None else batch_std) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    # the mean of equal rewards is not always exact in floating point (12 x 0.1), and std + eps is 1e-6:
    # zero dead groups explicitly, or they would push with |A| up to 0.06
    return centered.masked_fill(dead_groups(rewards, group_size)[:, None], 0.0).view(-1)


def dead_groups(rewards, group_size):
    """(n_prompts * group_size,) rewards -> (n_prompts,) bool: True where every reward in the group is equal."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1)


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, n_tokens=None, clip_dual=0.0,
                cov_control="none", cov_ratio=2e-4, kl_cov_coef=1.0, clip_cov_bounds=(1.0, 5.0)):
    """PPO-clip loss, token-mean: mean over all masked tokens of max(-A*rho, -A*clip(rho, 1-low, 1+high)).

    logp, old_logp, mask: (B, L); advantages: (B,) or (B, L). `n_tokens` is the token count of the whole
    batch (all micro-batches, all ranks); the default is this call's own count. Summing the losses of
    micro-batches that share one `n_tokens` gives exactly the full-batch loss. clip_dual = c > 1 (dual-clip PPO):
    a negative-advantage token's loss is at most -A*c, so a ratio far above 1 (a response its sampling policy found
    much less likely than the trained one does) cannot take over the update; PPO-clip alone bounds it only above 1
    for positive advantages. 0: off.
    cov_control: "none", or one of Cui et al. 2025's entropy controls, on the tokens `cov_tokens` selects:
      "clip_cov": the clipped loss above, with the selected tokens' loss (and gradient) set to 0;
      "kl_cov": no clip at all, -A*rho on every token plus kl_cov_coef * |log rho| on the selected ones.
    Returns (loss, clip_stats's dict): detached sums (and the ratio's min and max) for logging; "cov_tokens" counts
    the selected tokens.
    """
    mask = mask.to(logp.dtype)
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    ratio, per_token, held = _clipped(logp, old_logp, advantages, clip_low, clip_high, clip_dual,
                                      clip=cov_control != "kl_cov")
    selected = torch.zeros_like(held)
    if cov_control != "none":
        selected = cov_tokens(covariance(logp, advantages, mask), mask, cov_control, cov_ratio, clip_cov_bounds,
                              eligible=~held)
        if cov_control == "clip_cov":
            per_token = per_token.masked_fill(selected, 0.0)
        else:  # kl_cov
            per_token = per_token + kl_cov_coef * (logp - old_logp).abs() * selected
    loss = (per_token * mask).sum() / n_tokens
    return loss, dict(_summary(ratio, held, logp, old_logp, mask), cov_tokens=int(selected.sum()))


@torch.no_grad()
def clip_stats(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, clip_dual=0.0, clip=True):
    """How far the policy has moved from the one that sampled, over the masked tokens: how many the clip holds
    (zero gradient, the dual clip included), the ratio's sum, min and max, and the summed k3 estimate of KL(old || new).
    clip=False: a loss without a clip (KL-Cov), so nothing is held."""
    ratio, _, held = _clipped(logp, old_logp, advantages, clip_low, clip_high, clip_dual, clip)
    return _summary(ratio, held, logp, old_logp, mask.to(logp.dtype))


@torch.no_grad()
def covariance(logp, advantages, mask):
    """Each token's term of the covariance between log-prob and advantage (Cui et al. 2025): under a policy-gradient
    step the entropy falls by roughly the covariance of log pi(y) and A(y), so the tokens with the largest terms are
    the ones whose update lowers the entropy most.

    logp, mask: (B, L); advantages: (B,) or (B, L). Returns (B, L): (log pi_t - mean) * (A_t - mean), both means
    over the masked tokens of this call (like the authors' code: one micro-batch, here one prompt's group).
    """
    real = mask > 0
    advantages = (advantages[:, None] if advantages.dim() == 1 else advantages).expand_as(logp)
    if not real.any():
        return torch.zeros_like(logp)
    return (logp - logp[real].mean()) * (advantages - advantages[real].mean())


@torch.no_grad()
def cov_tokens(cov, mask, method, ratio, bounds=(1.0, 5.0), eligible=None):
    """Which tokens KL-Cov or Clip-Cov acts on, out of the N masked tokens -> (B, L) bool; k = max(1, int(ratio * N)).

    "kl_cov": the k tokens with the largest covariance terms. "clip_cov": k tokens drawn at random (torch's
    generator) among the eligible ones (those the clip does not already hold) whose term lies strictly between
    bounds[0] and bounds[1]; fewer if fewer qualify.
    """
    real = mask > 0
    n = int(real.sum())
    selected = torch.zeros_like(real)
    if n == 0:
        return selected
    k = max(1, int(ratio * n))
    if method == "kl_cov":
        top = cov.masked_fill(~real, -math.inf).flatten().topk(k).indices
    elif method == "clip_cov":
        low, high = bounds
        candidates = (real & (cov > low) & (cov < high) & (True if eligible is None else eligible)).flatten()
        candidates = candidates.nonzero().squeeze(1)
        top = candidates[torch.randperm(len(candidates), device=candidates.device)[:k]]
    else:
        raise ValueError(f"cov_control must be none, kl_cov or clip_cov, got {method!r}")
    return selected.flatten().index_fill(0, top, True).view_as(real)


def _clipped(logp, old_logp, advantages, clip_low, clip_high, clip_dual, clip=True):
    """The clipped objective per token -> (ratio, per-token loss, held: the tokens the clip gives no gradient).
    clip=False: the plain -A * rho, nothing held."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # clamped so one stale token cannot overflow
    unclipped = -advantages * ratio
    if not clip:
        return ratio, unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    held = clipped > unclipped
    if clip_dual > 0:
        bound = -advantages * clip_dual
        dual = (advantages < 0) & (bound < per_token)
        per_token, held = torch.where(dual, bound, per_token), held | dual
    return ratio, per_token, held


@torch.no_grad()
def _summary(ratio, held, logp, old_logp, mask):
    real = mask > 0
    return {"clipped_tokens": (held.to(mask.dtype) * mask).sum().item(), "tokens": mask.sum().item(),
            "ratio_sum": (ratio * mask).sum().item(),
            "ratio_min": ratio[real].min().item() if real.any() else math.inf,
            "ratio_max": ratio[real].max().item() if real.any() else -math.inf,
            "approx_kl": (kl_penalty(old_logp, logp) * mask).sum().item()}


def kl_penalty(logp, ref_logp):
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, low variance."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1

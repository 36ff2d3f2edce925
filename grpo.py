"""How the policy learns: GRPO's group-normalized advantages, per-token log-probs, the clipped objective, KL.

Each prompt gets a group of sampled responses; a response's advantage is its reward standardized within
its group, so no value network is needed. The policy then takes a PPO-clip step on every response token.
"""
import torch
from torch.utils.checkpoint import checkpoint

from tsec import token_entropy


def group_advantages(rewards, group_size, eps=1e-6):
    """Rewards (n_prompts * group_size,), laid out group by group -> advantages of the same shape.

    A = (r - mean) / (std + eps) within each group, unbiased std. A group whose rewards are all equal (a
    "dead group": nothing to learn from) gets A = 0 exactly.
    """
    if group_size < 2:
        raise ValueError("group advantages need at least 2 responses per prompt (n_clean + n_adv >= 2)")
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def _logp_and_entropy(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature  # (n, V) in fp32: the one big tensor, kept per chunk
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    return logp, token_entropy(logits)  # logits are already divided by the temperature


def token_logprobs(hidden, lm_head, targets, mask, temperature=1.0, chunk_size=1024):
    """Log-prob of each response token and the entropy of its next-token distribution, chunk by chunk.

    hidden: (B, L, D) states predicting each response token (model.response_hidden); targets, mask: (B, L).
    Returns logp, entropy: (B, L) fp32, zero at padding. Only valid positions are pushed through the LM head,
    `chunk_size` at a time; under autograd each chunk is checkpointed, so the (chunk, vocab) logits are
    recomputed in backward instead of stored: memory grows with the response length times D, not times V.
    """
    mask = mask.bool()
    h, t = hidden[mask], targets[mask]  # (N, D), (N,): padding never reaches the LM head
    logp_parts, ent_parts = [], []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], lm_head.weight, t[i:i + chunk_size], temperature)
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_logp_and_entropy, *args, use_reentrant=False)
        else:
            lp, ent = _logp_and_entropy(*args)
        logp_parts.append(lp)
        ent_parts.append(ent)
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(mask.shape, dtype=torch.float32)
    if logp_parts:
        logp = logp.masked_scatter(mask, torch.cat(logp_parts))
        entropy = entropy.masked_scatter(mask, torch.cat(ent_parts))
    return logp, entropy


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, n_tokens=None):
    """PPO-clip loss, token-mean: mean over all masked tokens of max(-A*rho, -A*clip(rho, 1-low, 1+high)).

    logp, old_logp, mask: (B, L); advantages: (B,) or (B, L). `n_tokens` is the token count of the whole
    batch (all micro-batches, all ranks); the default is this call's own count. Summing the losses of
    micro-batches that share one `n_tokens` gives exactly the full-batch loss.
    Returns (loss, stats) with stats holding detached sums for logging.
    """
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # clamped so one stale token cannot overflow
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = (per_token * mask).sum() / n_tokens
    stats = {"clipped_tokens": ((clipped > unclipped).to(mask.dtype) * mask).sum().item(),
             "tokens": mask.sum().item()}
    return loss, stats


def kl_penalty(logp, ref_logp):
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, low variance."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1

"""How the policy learns: GRPO's group-normalized advantages, per-token log-probs, the clipped objective, KL.

Each prompt gets a group of sampled responses; a response's advantage is its reward standardized within
its group, so no value network is needed. The policy then takes a PPO-clip step on every response token.
"""
import torch


def group_advantages(rewards, group_size, eps=1e-6):
    """Rewards (n_prompts * group_size,), laid out group by group -> advantages of the same shape.

    A = (r - mean) / (std + eps) within each group, unbiased std. A group whose rewards are all equal (a
    "dead group": nothing to learn from) gets A = 0 exactly.
    """
    if group_size < 2:
        raise ValueError("group advantages need at least 2 responses per prompt (n_clean + n_adv >= 2)")
    r = rewards.view(-1, group_size)
    advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    # the mean of equal rewards is not always exact in floating point (12 x 0.1), and std + eps is 1e-6:
    # zero dead groups explicitly, or they would push with |A| up to 0.06
    return advantages.masked_fill(dead_groups(rewards, group_size)[:, None], 0.0).view(-1)


def dead_groups(rewards, group_size):
    """(n_prompts * group_size,) rewards -> (n_prompts,) bool: True where every reward in the group is equal."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1)


def _scaled_logits(h, weight, temperature):
    """(n, D), (V, D) -> (n, V) fp32 logits / T, divided in place (no second (n, V) tensor).

    The product runs in the weight's dtype (bf16 under FSDP2's compute weights, where autocast is off), the softmax
    that follows in fp32."""
    logits = (h.to(weight.dtype) @ weight.T).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


class _HeadLogpEntropy(torch.autograd.Function):
    """Target log-prob and entropy of softmax(h W^T / T) for one chunk of positions, never storing the logits.

    h: (n, D), weight: (V, D), targets: (n,) -> logp, entropy: (n,) fp32. Like activation checkpointing, backward
    recomputes the (n, V) logits; unlike it, the gradient is written in closed form into one buffer, so a chunk
    costs 2 (n, V) fp32 tensors at peak (autograd through log_softmax, exp and the product would keep ~5).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature):
        # same autocast (bf16 matmul on GPU) in the recomputation as here, so backward sees identical logits
        ctx.autocast = (torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type))
        logp_all = torch.log_softmax(_scaled_logits(h, weight, temperature), dim=-1)  # (n, V)
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -logp_all.exp().mul_(logp_all).sum(-1)  # H = -sum_v p_v log p_v
        ctx.save_for_backward(h, weight, targets, entropy)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, targets, entropy = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
            logp_all = torch.log_softmax(_scaled_logits(h, weight, ctx.temperature), dim=-1)
            p = logp_all.exp()
            # dH/dz = -p * (log p + H);  d log p_t / dz = onehot(t) - p;  z = logits / T
            grad_z = logp_all.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])  # reuses logp_all's memory
            grad_z.sub_(p.mul_(grad_logp[:, None]))
            grad_z.scatter_add_(-1, targets[:, None], grad_logp[:, None]).div_(ctx.temperature)
            del p
            # grad_z is fp32; the two products run in the weight's dtype, as the forward's did (with autocast on,
            # it casts by itself; FSDP2's bf16 compute weights run with autocast off), and the gradients come
            # back in the dtypes of h and weight
            grad_z = grad_z.to(weight.dtype)
            grad_h = (grad_z @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (grad_z.T @ h.to(weight.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def token_logprobs(hidden, lm_head, targets, mask, temperature=1.0, chunk_size=1024):
    """Log-prob of each response token and the entropy of its next-token distribution, chunk by chunk.

    hidden: (B, L, D) states predicting each response token (model.response_hidden); targets, mask: (B, L).
    lm_head: the LM head module, or its (V, D) weight (pass a detached weight when only `hidden` needs a gradient,
    as in the attack: then no weight gradient is computed). Returns logp, entropy: (B, L) fp32, zero where mask is 0.
    Only masked positions are pushed through the LM head, `chunk_size` at a time, and the (chunk, vocab) logits are
    recomputed in backward instead of stored: memory grows with the response length times D, not times V.
    """
    weight = lm_head.weight if isinstance(lm_head, torch.nn.Module) else lm_head
    mask = mask.bool()
    h, t = hidden[mask], targets[mask]  # (N, D), (N,): padding never reaches the LM head
    logp_parts, ent_parts = [], []
    for i in range(0, h.shape[0], chunk_size):
        lp, ent = _HeadLogpEntropy.apply(h[i:i + chunk_size], weight, t[i:i + chunk_size], temperature)
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

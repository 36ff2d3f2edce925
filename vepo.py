"""Which tokens get the policy gradient: VEPO's vision-anchored selection, and the 80/20 entropy baseline.

VEPO ("Entropy Is Not Enough", arXiv 2606.03937) asks, per response token, how much its next-token
distribution depends on the image: it runs a second teacher-forced pass with the image drowned in noise and
compares the two distributions (their Jensen-Shannon divergence and their entropy gap), weighted by how
uncertain the token is on the clean image. Only the top 20% of each response's tokens by that score receive
policy gradient. The "80/20" baseline keeps the top 20% by entropy alone. Both are masks on the token-mean
policy loss (`grpo.policy_loss`); SaEI acts at sampling time, these at optimisation time, so they combine.
"""
import math

import torch

from model import entropy_from_logp

TOP_FRACTION = 0.2  # share of each response's tokens that receive policy gradient
NOISE_STD = 2.0     # std of the Gaussian noise added to the normalized pixel values for the perturbed pass
JSD_WEIGHT = 0.7    # alpha: weight of the JSD against the entropy gap in the score


def perturb_pixels(pixel_values, std=NOISE_STD):
    """Normalized pixel_values (N, 1176) -> the same plus N(0, std^2) noise: VEPO's counterfactual image."""
    return pixel_values + std * torch.randn_like(pixel_values)


def jsd(logp, logq):
    """Jensen-Shannon divergence in nats of two distributions given as log-probs: (..., V), (..., V) -> (...).

    JSD = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2: symmetric, 0 iff p = q, at most ln 2.
    """
    logm = torch.logaddexp(logp, logq) - math.log(2)

    def kl_to_m(logx):
        x = logx.exp()
        return torch.where(x > 0, x * (logx - logm), 0.0).sum(-1)  # 0 log 0 = 0

    return 0.5 * (kl_to_m(logp) + kl_to_m(logq))


@torch.no_grad()
def token_jsd(hidden, hidden_noisy, weight, mask, temperature=1.0, chunk_size=1024):
    """Per response token: JSD between its clean and perturbed next-token distributions, and the perturbed entropy.

    hidden, hidden_noisy: (B, L, D) states on the clean and the perturbed image (model.response_hidden);
    weight: (V, D) LM head; mask: (B, L). Returns jsd, entropy_noisy: (B, L) fp32, zero where mask is 0.
    Only masked positions reach the LM head, `chunk_size` at a time: a few (chunk, V) tensors, never (B, L, V).
    """
    mask = mask.bool()
    h, hn = hidden[mask], hidden_noisy[mask]  # (N, D)
    jsd_parts, ent_parts = [], []
    for i in range(0, h.shape[0], chunk_size):
        logp = torch.log_softmax((h[i:i + chunk_size] @ weight.T).float() / temperature, dim=-1)
        logq = torch.log_softmax((hn[i:i + chunk_size] @ weight.T).float() / temperature, dim=-1)
        jsd_parts.append(jsd(logp, logq))
        ent_parts.append(entropy_from_logp(logq))
    out_jsd = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    out_ent = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    if jsd_parts:
        out_jsd = out_jsd.masked_scatter(mask, torch.cat(jsd_parts))
        out_ent = out_ent.masked_scatter(mask, torch.cat(ent_parts))
    return out_jsd, out_ent


def minmax(x, mask):
    """Min-max normalize each row over its masked entries: (B, L) -> (B, L) in [0, 1].

    0 where mask is 0, and for a row whose masked values are all equal (nothing to rank them by).
    """
    mask = mask.bool()
    lo = x.masked_fill(~mask, math.inf).amin(1, keepdim=True)
    hi = x.masked_fill(~mask, -math.inf).amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (x - lo) / span.clamp(min=1e-30), 0.0)
    return out.masked_fill(~mask, 0.0)


def score(jsd, entropy, entropy_gap, mask, alpha=JSD_WEIGHT):
    """VEPO's token score s = (1 - (1 - j)^alpha * (1 - g)^(1 - alpha)) * h.

    jsd, entropy (clean H), entropy_gap (H_noisy - H, sign ignored), mask: (B, L). j, g = |gap| and h are each
    min-max normalized within their response; s is high where a token is uncertain *and* its distribution moves
    when the image is destroyed. Returns (B, L), 0 where mask is 0.
    """
    j, h, g = minmax(jsd, mask), minmax(entropy, mask), minmax(entropy_gap.abs(), mask)
    return (1 - (1 - j) ** alpha * (1 - g) ** (1 - alpha)) * h


def n_top(mask, fraction=TOP_FRACTION):
    """(B, L) mask -> (B,) tokens kept per response: ceil(fraction * length), so every nonempty response keeps
    at least one (our default; the paper says "top 20%"). Depends on lengths only, so the loss's denominator is
    known before any forward pass."""
    return torch.ceil(mask.sum(1).double() * fraction - 1e-9).long()  # - 1e-9: 0.2 * 15 must stay 3


def top_fraction(values, mask, fraction=TOP_FRACTION):
    """Keep each response's n_top highest-`values` tokens. values, mask: (B, L) -> bool (B, L); ties by position."""
    mask = mask.bool()
    k = n_top(mask, fraction)
    order = values.detach().masked_fill(~mask, -math.inf).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k[:, None].to(rank.device)) & mask

"""Which tokens: token-selective entropy (TsEC).

SaEI does not raise the entropy of every response token. Low-entropy tokens carry the factual and perceptual
content the image attack must not distort; the highest-entropy tokens are already exploring. TsEC ranks the
response tokens by entropy and keeps only a middle band (paper: the middle third), and the attack in
`egas.py` ascends the mean entropy of just those tokens.
"""
import torch


def select_band(entropy, mask, band=(1 / 3, 2 / 3), group_size=None):
    """Keep the tokens whose entropy rank falls in the band.

    entropy, mask: (B, L). Tokens are ranked (ascending) within each group of `group_size` consecutive rows
    (each row alone when None); of n valid tokens, those with rank r in [round(lo*n), round(hi*n)) are kept.
    Padding (mask == 0) is never ranked nor selected. Returns a bool (B, L) mask. No gradient flows.
    """
    lo, hi = band
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"tsec_band must satisfy 0 <= lo <= hi <= 1, got {band}")
    B, L = entropy.shape
    group_size = group_size or 1
    if B % group_size:
        raise ValueError(f"{B} rows do not split into groups of {group_size}")
    mask = mask.bool()
    selected = torch.zeros_like(mask)
    for start in range(0, B, group_size):
        rows = slice(start, start + group_size)
        values = entropy[rows][mask[rows]].detach()  # the group's valid tokens, flattened
        n = values.numel()
        rank = torch.empty(n, dtype=torch.long, device=values.device)
        rank[values.argsort(stable=True)] = torch.arange(n, device=values.device)
        keep = (rank >= round(lo * n)) & (rank < round(hi * n))
        group_sel = torch.zeros_like(mask[rows])
        group_sel[mask[rows]] = keep
        selected[rows] = group_sel
    return selected


def selective_entropy(entropy, selected):
    """The TsEC objective J: mean entropy of the selected tokens of each response, then mean over responses.

    entropy, selected: (B, L). Responses with no selected token do not count. Returns a scalar.
    """
    selected = selected.to(entropy.dtype)
    per_response_count = selected.sum(1)
    has_tokens = per_response_count > 0
    per_response = (entropy * selected).sum(1)[has_tokens] / per_response_count[has_tokens]
    return per_response.mean()

"""How the image is attacked: entropy-guided adversarial sampling (EgAS).

Before the second half of the rollouts, SaEI nudges the image so the policy becomes *less* certain on the
TsEC-selected tokens of its own clean responses: one (or a few) signed-gradient PGD steps on the raw pixels,
ascending the selective entropy. Rollouts on the perturbed image then explore more, in the places where
exploration is cheap. The policy's weights are untouched: gradients go to the pixels only.
"""
import torch

import tsec
from data import image_to_pixels
from grpo import token_logprobs
from model import response_hidden


def pgd(objective, x, steps, alpha, eps):
    """Projected signed-gradient ascent of the scalar `objective(x)` on an image.

    x: (3, H, W) in [0, 1]. Each step: x <- clip_[0,1](proj_eps(x + alpha * sign(grad))), rounded to the
    1/255 grid so the result is still a valid 8-bit image (alpha < 0 descends instead). Returns x_adv, detached.
    """
    x0 = x.detach()
    x_adv = x0.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
        x_adv = torch.round(x_adv * 255) / 255
    return x_adv


def attack(model, x, sequences, attention_mask, response_mask, prompt_len, steps, alpha, eps,
           band=(1 / 3, 2 / 3), scope="group", temperature=1.0, chunk_size=1024):
    """EgAS on one prompt: perturb its image to raise the TsEC entropy of its clean responses.

    x: (3, H, W) the clean image in [0, 1]; sequences, attention_mask: (n, P + L) the prompt + its n clean
    responses; response_mask: (n, L). Tokens are ranked once, on the clean image and without gradient, within
    the group of n responses (scope "group") or per response ("response"); the objective then applies the LM
    head with gradient to the selected positions only (DESIGN §6).
    Returns x_adv and stats: objective on x and on x_adv (same tokens), their difference `gain`, and
    `fallback` = 1 when the band selected nothing and all tokens were used instead.
    """
    n = sequences.shape[0]
    targets = sequences[:, prompt_len:]
    selected, stats = None, {"fallback": 0}

    def objective(img):
        nonlocal selected
        pixel_values, grid = image_to_pixels(img)
        hidden = response_hidden(model, sequences, attention_mask, pixel_values.repeat(n, 1), grid.repeat(n, 1),
                                 prompt_len)  # (n, L, D)
        if selected is None:  # rank on the clean image, without gradient
            with torch.no_grad():
                _, entropy = token_logprobs(hidden.detach(), model.lm_head, targets, response_mask, temperature,
                                            chunk_size)
            selected = tsec.select_band(entropy, response_mask, band, group_size=n if scope == "group" else 1)
            if not selected.any():  # too few tokens for the band (very short responses): use them all
                selected, stats["fallback"] = response_mask.bool(), 1
        entropy_sel = tsec.token_entropy(model.lm_head(hidden[selected]), temperature)  # (n_selected,)
        full = torch.zeros(selected.shape, dtype=entropy_sel.dtype, device=entropy_sel.device)
        objective_value = tsec.selective_entropy(full.masked_scatter(selected, entropy_sel), selected)
        stats.setdefault("objective_clean", objective_value.item())
        return objective_value

    x_adv = pgd(objective, x, steps, alpha, eps) if steps > 0 else x.detach().clone()
    with torch.no_grad():
        if selected is None:
            objective(x)
        stats["objective_adv"] = objective(x_adv).item()
    stats["gain"] = stats["objective_adv"] - stats["objective_clean"]
    return x_adv, stats

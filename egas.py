"""How the image is attacked: entropy-guided adversarial sampling (EgAS).

Before the second half of the rollouts, SaEI nudges the image so the policy becomes *less* certain on the
TsEC-selected tokens of its own clean responses: one (or a few) signed-gradient PGD steps on the raw pixels,
ascending the selective entropy. Rollouts on the perturbed image then explore more, in the places where
exploration is cheap. The policy's weights are untouched: gradients go to the pixels only.
NoisyRollout's random alternative (`perturb="noise"`) lives here too: annealed diffusion-style noise.
"""
import math

import torch

import tsec
from data import image_to_pixels
from model import shared_prompt_hidden
from grpo import token_logprobs


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


def perturbation_size(x, x_adv):
    """(L-inf, L2) distance between two (3, H, W) images in [0, 1], in 1/255 units (one 8-bit grey level = 1)."""
    delta = (x_adv - x).double().cpu() * 255
    return delta.abs().max().item(), delta.norm().item()


def noise_level(step, max_steps, k0=500, mid=2 / 3, sharpness=30.0):
    """NoisyRollout's annealed diffusion step k for training step `step` (1-based) of `max_steps`.

    k = floor(k0 * (1 - sigmoid(sharpness * (step / max_steps - mid)))): ~k0 early, k0 / 2 at `mid` of the run,
    0 at the end. The released recipe (gaussian_noise_step=500, sigmoid decay_coef=30, decay_sig_mid_step=40
    of its 60 Geometry3K steps) written relative to the run length, so it fits runs of any length.
    """
    return int(k0 * (1 - 1 / (1 + math.exp(-sharpness * (step / max_steps - mid)))))


def alpha_bar(n_steps=1000, beta_min=1e-5, beta_max=5e-3):
    """(n_steps,) fp64 alpha_bar_k = prod_{i <= k} (1 - beta_i), beta linear in a sigmoid over [-6, 6]."""
    betas = beta_min + (beta_max - beta_min) * torch.sigmoid(torch.linspace(-6, 6, n_steps, dtype=torch.float64))
    return torch.cumprod(1 - betas, 0)


def add_noise(x, k):
    """Diffusion forward process to step k: sqrt(abar_k) x + sqrt(1 - abar_k) eps, eps ~ N(0, 1).

    x: (3, H, W) in [0, 1] -> same shape, clipped to [0, 1] and rounded to the 1/255 grid (NoisyRollout's
    noisy image is an 8-bit PIL image). eps comes from torch's global RNG, which train.py seeds per rank.
    """
    abar = alpha_bar()[k].item()
    x_k = math.sqrt(abar) * x + math.sqrt(1 - abar) * torch.randn_like(x)
    return torch.round(x_k.clamp(0.0, 1.0) * 255) / 255


def tsec_objective(model, sequences, attention_mask, response_mask, prompt_len, band=(1 / 3, 2 / 3), scope="group",
                   temperature=1.0, chunk_size=1024):
    """The TsEC objective J(image) on one prompt's n clean responses, as a function of the [0, 1] image.

    sequences, attention_mask: (n, P + L) the prompt + its n clean responses; response_mask: (n, L). On the first
    call the tokens are ranked by entropy without gradient, within the group of n responses (scope "group") or per
    response ("response"), and the band is kept fixed for later calls. The LM head then runs with gradient on the
    selected positions only, chunk by chunk (DESIGN §6), and the prompt is encoded once (`shared_prompt_hidden`).
    Returns (objective, state): objective(img (3, H, W)) -> scalar J; state["selected"] the (n, L) bool band and
    state["fallback"] = 1 when the band selected nothing and all tokens were used instead.
    """
    n = sequences.shape[0]
    targets = sequences[:, prompt_len:]
    state = {"selected": None, "fallback": 0}

    def objective(img):
        pixel_values, grid = image_to_pixels(img)
        hidden = shared_prompt_hidden(model, sequences, attention_mask, pixel_values, grid, prompt_len)  # (n, L, D)
        # weights are constants here, so no weight gradient is computed; read after the forward, which under
        # FSDP2 is when the LM head holds its gathered (unsharded) weight
        head = model.lm_head.weight.detach()
        if state["selected"] is None:  # rank on the first (clean) image, without gradient
            with torch.no_grad():
                _, entropy = token_logprobs(hidden.detach(), head, targets, response_mask, temperature, chunk_size)
            selected = tsec.select_band(entropy, response_mask, band, group_size=n if scope == "group" else 1)
            if not selected.any():  # too few tokens for the band (very short responses): use them all
                selected, state["fallback"] = response_mask.bool(), 1
            state["selected"] = selected
        # the LM head with gradient on the selected positions only, chunked: never an (n, L, V) tensor
        _, entropy = token_logprobs(hidden, head, targets, state["selected"], temperature, chunk_size)
        return tsec.selective_entropy(entropy, state["selected"])

    return objective, state


def attack(model, x, sequences, attention_mask, response_mask, prompt_len, steps, alpha, eps,
           band=(1 / 3, 2 / 3), scope="group", temperature=1.0, chunk_size=1024):
    """EgAS on one prompt: perturb its image to raise the TsEC entropy of its clean responses.

    x: (3, H, W) the clean image in [0, 1]; sequences, attention_mask: (n, P + L) the prompt + its n clean
    responses; response_mask: (n, L). PGD ascends `tsec_objective`, whose tokens are ranked on the clean image.
    Returns x_adv and stats: objective on x and on x_adv (same tokens), their difference `gain`, and
    `fallback` = 1 when the band selected nothing and all tokens were used instead.
    """
    objective, state = tsec_objective(model, sequences, attention_mask, response_mask, prompt_len, band, scope,
                                      temperature, chunk_size)
    stats = {}

    def logged(img):  # PGD's first call is on the clean image: record J there for free
        value = objective(img)
        stats.setdefault("objective_clean", value.item())
        return value

    x_adv = pgd(logged, x, steps, alpha, eps) if steps > 0 else x.detach().clone()
    with torch.no_grad():
        if "objective_clean" not in stats:
            logged(x)
        stats["objective_adv"] = objective(x_adv).item()
    stats["gain"] = stats["objective_adv"] - stats["objective_clean"]
    stats["fallback"] = state["fallback"]
    return x_adv, stats

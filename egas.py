"""How the image is attacked: entropy-guided adversarial sampling (EgAS).

Before the second half of the rollouts, SaEI nudges the image so the policy becomes *less* certain on the
TsEC-selected tokens of its own clean responses: one (or a few) signed-gradient PGD steps on the raw pixels,
ascending the selective entropy. Rollouts on the perturbed image then explore more, in the places where
exploration is cheap. The policy's weights are untouched: gradients go to the pixels only.
NoisyRollout's random alternative (`perturb="noise"`) lives here too: annealed diffusion-style noise; and the
attack's own control (`perturb="random_sign"`): the same budget in random directions.
"""
import math

import torch
from transformers import DynamicCache

import tsec
from data import image_to_pixels
from model import (entropy_from_logp, gather_weights, multimodal_positions, release_weights,
                   shared_prompt_hidden, token_logprobs, trimmed_sequences)


def pgd(value_and_grad, images, steps, alpha, eps):
    """Projected signed-gradient ascent of one scalar objective per image.

    value_and_grad(images) -> (objectives, their gradients, one (3, H, W) per image); images: (3, H, W) tensors in
    [0, 1], each its own size. Each step, for every image: x <- clip_[0,1](proj_eps(x + alpha * sign(grad))),
    rounded to the 1/255 grid so the result is still a valid 8-bit image (alpha < 0 descends instead).
    Returns the attacked images, detached.
    """
    clean = [x.detach() for x in images]
    attacked = [x.clone() for x in clean]
    for _ in range(steps):
        _, grads = value_and_grad(attacked)
        for i, (x0, grad) in enumerate(zip(clean, grads)):
            x = attacked[i] + alpha * grad.sign()
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0.0, 1.0)
            attacked[i] = torch.round(x * 255) / 255
    return attacked


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


def full_logits_objective(model, x, sequences, attention_mask, prompt_len, selected, temperature=1.0):
    """The TsEC objective J(image) written plainly: the full logits of one prompt's n clean responses.

    x: (3, H, W) in [0, 1] (with requires_grad for the attack); sequences, attention_mask: (n, P + L) the prompt and
    its responses; selected: (n, L) bool, the band (tsec.select_band, ranked on the clean image). Returns the
    scalar J, differentiable in x. Memory: the (n, L, V) logits and their graph -- fine for the tiny demo model, not
    for Qwen's 152k vocabulary over long responses; `tsec_objective` is the same J in the memory of one response.
    """
    pixel_values, grid = image_to_pixels(x)
    hidden = shared_prompt_hidden(model, sequences, attention_mask, pixel_values, grid, prompt_len)  # (n, L, D)
    logp = torch.log_softmax(model.lm_head(hidden).float() / temperature, dim=-1)  # (n, L, V)
    return tsec.selective_entropy(entropy_from_logp(logp), selected)


def tsec_objective(model, sequences, attention_mask, response_mask, prompt_len, selected, temperature=1.0,
                   chunk_size=1024, rows_per_pass=1):
    """The TsEC objective J(image) on one prompt's n clean responses, and its gradient, in the memory of
    `rows_per_pass` responses.

    sequences, attention_mask: (n, P + L) the prompt + its n clean responses, right-padded; response_mask: (n, L);
    selected: (n, L) bool, the band's tokens (tsec.select_band, ranked once on the clean image). J is the mean over
    responses of each response's mean entropy on its band, so each response's weight is known before its forward
    pass: the prompt and image are encoded once, then the responses, `rows_per_pass` at a time (1: each alone,
    trimmed to its own length), run their forward and backward, their share of the gradient accumulated into the
    prompt's keys/values; one backward through the prompt then reaches the pixels. More rows per pass: the same
    value and gradient, more memory, fewer passes (on a small model, much less time). The LM head runs on the
    selected positions only, chunk by chunk (Qwen's 152k-token vocabulary makes full logits the memory trap).
    Returns objective(img (3, H, W), grad=False) -> (J as a float, dJ/dimg (3, H, W) or None).
    """
    n = sequences.shape[0]
    if not (sequences[:, :prompt_len] == sequences[:1, :prompt_len]).all():
        raise ValueError("tsec_objective: all rows must share one prompt")
    lengths = response_mask.sum(1).tolist()  # right-padded: response j is its first lengths[j] tokens
    targets = sequences[:, prompt_len:]
    counts = selected.sum(1)
    positions = []  # Qwen2.5-VL's 3D positions of the whole rows, computed once: the image size never changes

    def encode_prompt(img):
        """img -> the state predicting response token 0 (1, 1, D) and the prompt's keys/values, one pair per layer."""
        pixel_values, grid = image_to_pixels(img)
        if not positions:
            positions.append(multimodal_positions(model, sequences, attention_mask, grid.repeat(n, 1)))
        out, states = _forward(model, input_ids=sequences[:1, :prompt_len], attention_mask=attention_mask[:1, :prompt_len],
                               pixel_values=pixel_values, image_grid_thw=grid,
                               position_ids=positions[0][:, :1, :prompt_len])
        return states[:, -1:], [(layer.keys, layer.values) for layer in out.cache.layers]

    def response_states(rows, last, prompt_kv):
        """(m, L, D): the states predicting the tokens of responses `rows` (right-padded to their longest, L),
        given the encoded prompt, whose keys/values the m rows share."""
        m, end = len(rows), prompt_len + max(lengths[j] for j in rows)
        cache = DynamicCache([(k.expand(m, -1, -1, -1), v.expand(m, -1, -1, -1)) for k, v in prompt_kv])
        _, states = _forward(model, input_ids=sequences[rows, prompt_len:end], attention_mask=attention_mask[rows, :end],
                             cache=cache, position_ids=positions[0][:, rows, prompt_len:end])
        return torch.cat([last.expand(m, -1, -1), states[:, :-1]], 1)

    def objective(img, grad=False):
        img = img.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            last, prompt_kv = encode_prompt(img)
        # leaves standing for the prompt's outputs: each response's backward stops here and adds to their .grad
        leaves = [t.detach().requires_grad_(grad) for t in [last] + [t for kv in prompt_kv for t in kv]]
        leaf_kv = list(zip(leaves[1::2], leaves[2::2]))
        # weights are constants here, so no weight gradient is computed; read after a forward, which under
        # FSDP2 is when the LM head holds its gathered (unsharded) weight
        head = model.lm_head.weight.detach()
        total = 0.0
        counted = [j for j in range(n) if counts[j] > 0]  # a response with no selected token does not count
        for first in range(0, len(counted), rows_per_pass):
            rows = counted[first:first + rows_per_pass]
            width = max(lengths[j] for j in rows)
            with torch.set_grad_enabled(grad):
                _, entropy = token_logprobs(response_states(rows, leaves[0], leaf_kv), head,
                                            targets[rows, :width], selected[rows, :width], temperature, chunk_size)
                # these responses' share of J: tsec's selective entropy over them, weighted by how many they are
                part = tsec.selective_entropy(entropy, selected[rows, :width]) * len(rows) / len(counted)
            if grad:
                torch.autograd.backward(part, inputs=leaves)  # frees these responses' graph
            total += part.item()
        if not grad:
            return total, None
        torch.autograd.backward([last] + [t for kv in prompt_kv for t in kv], [leaf.grad for leaf in leaves],
                                inputs=[img])
        return total, img.grad

    return objective


def _forward(model, **inputs):
    """One forward through the top-level module (so FSDP's hooks gather the weights) with a KV cache and
    logits_to_keep=1 -> (output, final hidden states (B, T, D)), caught by a hook on the final norm."""
    captured = []
    hook = model.model.language_model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        hook.remove()
    return out, captured[-1]


def plain_objective(model, sequences, attention_mask, prompt_len, selected, temperature):
    """full_logits_objective as f(x, grad) -> (J as a float, dJ/dx (3, H, W) or None), tsec_objective's form."""
    def objective(x, grad=False):
        x = x.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            value = full_logits_objective(model, x, sequences, attention_mask, prompt_len, selected, temperature)
        return value.item(), torch.autograd.grad(value, x)[0] if grad else None
    return objective


def attack(model, images, rollouts, n, steps=1, alpha=2 / 255, eps=None, band=(1 / 3, 2 / 3), scope="group",
           temperature=1.0, objective="bounded", rows_per_pass=1, chunk_size=1024):
    """EgAS on k prompts: perturb each image to raise the TsEC entropy of its n clean responses.

    images: k (3, H, W) clean images in [0, 1]; rollouts: sample()'s dict for the k * n clean responses (prompt i's
    are rows i * n ... i * n + n - 1), whose `response_entropy` -- each token's entropy on the clean image, as
    sampling recorded it -- ranks the band. steps, alpha, eps: PGD (eps None: |alpha| * steps); band, scope:
    tsec.select_band's, ranked within each prompt's group or per response. objective: how each prompt's J and its
    gradient are computed: "full_logits", the plain formula (full_logits_objective: the (n, L, V) logits of the
    prompt's responses at once; small models, the demo) or "bounded", in the memory of `rows_per_pass` responses
    (tsec_objective; any model size). The two give the same J and gradient (a test holds them equal).
    Returns (attacked images, stats per prompt: the objective on the clean and on the attacked image
    (same tokens), their difference `gain`, and `fallback` = 1 when the band selected nothing and all tokens
    were used instead).
    """
    eps = abs(alpha) * steps if eps is None else eps
    mask = rollouts["response_mask"]
    # 1. TsEC: rank the tokens once, on the clean image, without gradient, and keep the band fixed
    selected = tsec.select_band(rollouts["response_entropy"], mask, band, group_size=n if scope == "group" else 1)
    fallback = [int(not selected[i:i + n].any()) for i in range(0, mask.shape[0], n)]
    for p, empty in enumerate(fallback):  # too few tokens for the band (very short responses): use them all
        if empty:
            selected[p * n:(p + 1) * n] = mask[p * n:(p + 1) * n].bool()
    # 2. EgAS: PGD on the pixels, ascending each prompt's band mean entropy
    objectives = []  # per prompt: f(x, grad) -> (J, dJ/dx or None)
    for p in range(len(images)):
        rows = slice(p * n, (p + 1) * n)
        ids, attn, resp_mask, prompt_len = trimmed_sequences(rollouts, rows)
        band_rows = selected[rows, :resp_mask.shape[1]]
        if objective == "full_logits":
            objectives.append(plain_objective(model, ids, attn, prompt_len, band_rows, temperature))
        else:
            objectives.append(tsec_objective(model, ids, attn, resp_mask, prompt_len, band_rows, temperature,
                                             chunk_size, rows_per_pass))

    def value_and_grad(xs, grad=True):
        values, grads = zip(*[f(x, grad) for f, x in zip(objectives, xs)])
        return list(values), grads
    stats = {}

    def logged(xs):  # PGD's first call is on the clean images: record J there for free
        values, grads = value_and_grad(xs)
        stats.setdefault("objective_clean", values)
        return values, grads

    sharded = gather_weights(model)  # under FSDP2 each layer is gathered once for every prompt's passes
    try:
        attacked = pgd(logged, images, steps, alpha, eps) if steps > 0 else [x.detach().clone() for x in images]
        if "objective_clean" not in stats:
            stats["objective_clean"] = value_and_grad(images, grad=False)[0]
        stats["objective_adv"] = value_and_grad(attacked, grad=False)[0]
    finally:
        release_weights(sharded)
    return attacked, [{"objective_clean": c, "objective_adv": a, "gain": a - c, "fallback": f}
                      for c, a, f in zip(stats["objective_clean"], stats["objective_adv"], fallback)]


# ----------------------------------------------------------------------------- the perturbations train.py can use

def perturb_egas(policy, images, clean, step, cfg):
    """SaEI: one PGD attack per prompt on the TsEC band of its clean responses."""
    attacked, stats = attack(policy, images, clean, cfg.n_clean, steps=cfg.pgd_steps, alpha=cfg.pgd_alpha,
                             eps=cfg.pgd_eps, band=cfg.tsec_band, scope=cfg.tsec_scope, temperature=cfg.temperature,
                             objective=cfg.attack_objective, rows_per_pass=cfg.attack_rows, chunk_size=cfg.logit_chunk)
    return attacked, stats, {}


def perturb_random_sign(policy, images, clean, step, cfg):
    """EgAS's control: the same PGD steps and L-inf budget, each pixel's direction a fair coin instead of the sign of
    the entropy gradient (+/- pgd_alpha per step, projected, on the 1/255 grid). What the attack adds over an
    equally large perturbation that knows nothing of the policy."""
    coin = lambda xs: (None, [torch.randn_like(x) for x in xs])  # the sign of a normal draw: +1 or -1, evenly
    return pgd(coin, images, cfg.pgd_steps, cfg.pgd_alpha, cfg.pgd_eps), [], {}


def perturb_noise(policy, images, clean, step, cfg):
    """NoisyRollout: annealed random noise, strong early in the run and ~0 at its end."""
    k = noise_level(step, cfg.max_steps)
    return [add_noise(x, k) for x in images], [], {"noise_k": k}


def perturb_none(policy, images, clean, step, cfg):
    """The second half sees the clean image too."""
    return list(images), [], {}


# perturb = name -> (the method, as a model card names it; the function). A perturbation is a function of (policy,
# the k clean images, sample()'s dict of their clean rollouts, the step, the run's config) -> (the images the n_adv
# rollouts see, attack stats per prompt or [], metrics to log); adding one is a function and an entry here.
PERTURBATIONS = {"egas": ("SaEI", perturb_egas), "random_sign": ("SaEI's random-sign control", perturb_random_sign),
                 "noise": ("NoisyRollout", perturb_noise), "none": ("GRPO", perturb_none)}


import math
import os

import pytest
import torch

import data
import egas
import grpo
import model as model_lib
import tsec

GEO3K_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                            "geometry3k-sample", "test.parquet")


@pytest.fixture(scope="module")
def geo3k():
    import datasets
    return datasets.load_dataset("parquet", data_files=GEO3K_SAMPLE, split="train")


@pytest.fixture(scope="module")
def tiny():
    policy, tok = model_lib.load_policy("tiny", seed=0)
    return policy.eval(), tok


# ----------------------------------------------------------------------------- data.py

def test_data_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    for h, w in [(28, 28), (10, 1000), (251, 250), (453, 628), (303, 214), (4000, 3000), (57, 3), (1080, 1920)]:
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (262144, 1000000), (112 * 112, 112 * 112)]:
            assert data.smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf_smart_resize(h, w, min_pixels=lo, max_pixels=hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        data.smart_resize(10, 3000)


@pytest.mark.parametrize("min_pixels,max_pixels", [(262144, 1000000), (56 * 56, 128 * 28 * 28)])
def test_data_pixel_map_equals_qwen_image_processor_on_real_diagrams(geo3k, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    for row in geo3k:
        image = row["images"][0]
        assert image.mode == "RGBA"  # the real diagrams carry transparency; both sides composite onto white
        reference = processor(images=[image], return_tensors="pt")
        x = data.load_image(image, min_pixels, max_pixels)
        pixel_values, grid = data.image_to_pixels(x)
        assert grid.tolist() == reference["image_grid_thw"].tolist()
        assert pixel_values.shape == reference["pixel_values"].shape
        assert (pixel_values - reference["pixel_values"]).abs().max().item() < 1e-5
        assert data.n_image_tokens(x) == int(grid.prod()) // 4


def test_data_pixel_map_is_differentiable_and_local():
    x = torch.rand(3, 56, 84, requires_grad=True)
    pixel_values, grid = data.image_to_pixels(x)
    assert grid.tolist() == [[1, 4, 6]] and pixel_values.shape == (24, 1176)
    pixel_values[0].sum().backward()  # the first patch: the top-left 14x14 pixels, in both frames
    touched = x.grad.abs().sum(0) > 0
    assert touched[:14, :14].all() and touched.sum() == 14 * 14
    assert torch.allclose(x.grad[:, :14, :14], 2 / torch.tensor(data.CLIP_STD).view(3, 1, 1).expand(3, 14, 14))


def test_data_build_prompt_places_image_and_expands_pads(tiny):
    _, tok = tiny
    ids = data.build_prompt(tok, "Look: <image> What is x?", 16)
    text = tok.decode(ids)
    assert text.count("<|image_pad|>") == 16
    assert text.index("Look:") < text.index("<|vision_start|>") < text.index("What is x?")
    assert text.rstrip().endswith("<|im_start|>assistant")
    no_placeholder = tok.decode(data.build_prompt(tok, "What is x?", 4))
    assert no_placeholder.index("<|vision_end|>") < no_placeholder.index("What is x?")
    with pytest.raises(ValueError, match="placeholders"):
        data.build_prompt(tok, "<image> and <image>", 4)


# ----------------------------------------------------------------------------- model.py

def test_model_unknown_name_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model 'Qwen9-VL'"):
        model_lib.load_policy("Qwen9-VL")
    with pytest.raises(SystemExit, match="does not exist"):
        model_lib.load_policy("./no/such/checkpoint")


def test_model_response_hidden_predicts_response_tokens(tiny):
    policy, tok = tiny
    x = torch.rand(3, 56, 56)
    prompt = data.build_prompt(tok, "<image>count", data.n_image_tokens(x))
    response = tok("<think>ab</think>\\boxed{1}<|im_end|>").input_ids
    ids = torch.tensor([prompt + response])
    pv, grid = data.image_to_pixels(x)
    with torch.no_grad():
        full_logits = policy(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                             mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits
        hidden = model_lib.response_hidden(policy, ids, torch.ones_like(ids), pv, grid, len(prompt))
    assert hidden.shape[1] == len(response)
    expected = full_logits[0, len(prompt) - 1:-1]
    assert torch.allclose(policy.lm_head(hidden)[0], expected, atol=1e-5)


def test_model_image_tokens_get_3d_rotary_positions(tiny):
    policy, tok = tiny
    x = torch.rand(3, 56, 84)  # 4 x 6 patches: 2 x 3 merged image tokens
    ids = torch.tensor([data.build_prompt(tok, "<image>q", data.n_image_tokens(x))])
    pv, grid = data.image_to_pixels(x)
    pos = model_lib.multimodal_positions(policy, ids, torch.ones_like(ids), grid)  # (3, 1, T)
    image = ids[0] == policy.config.image_token_id
    rows, cols = pos[1, 0, image], pos[2, 0, image]
    assert (rows - rows.min()).tolist() == [0, 0, 0, 1, 1, 1] and (cols - cols.min()).tolist() == [0, 1, 2, 0, 1, 2]
    # response_hidden uses them: a forward without the image-token types (plain text positions) differs
    with torch.no_grad():
        ours = model_lib.response_hidden(policy, ids, torch.ones_like(ids), pv, grid, ids.shape[1] - 3)
        plain = policy(input_ids=ids, pixel_values=pv, image_grid_thw=grid, output_hidden_states=True).hidden_states[-1]
    assert (ours - plain[:, -4:-1]).abs().max() > 1e-4


def test_model_sample_never_emits_vision_tokens(tiny):
    policy, tok = tiny
    policy = model_lib.Qwen2_5_VLForConditionalGeneration(policy.config).eval()
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        policy.lm_head.weight[pad_id] = policy.lm_head.weight[pad_id] * 0 + 1.0  # make <|image_pad|> very likely
    x = torch.rand(3, 56, 56)
    prompt = data.build_prompt(tok, "<image>q", data.n_image_tokens(x))
    out = model_lib.sample(policy, tok, [prompt], [x], n=4, max_new_tokens=24)
    vision = torch.tensor(model_lib.vision_token_ids(tok))
    assert not torch.isin(out["response_ids"], vision).any()
    # the mask ends at the first stop token and the tensors agree on what is padding
    stops = torch.tensor(model_lib.stop_token_ids(tok))
    for ids, mask, truncated in zip(out["response_ids"], out["response_mask"], out["truncated"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert truncated == (not torch.isin(ids[n - 1], stops))


# ----------------------------------------------------------------------------- tsec.py

def test_tsec_token_entropy_matches_formula():
    logits = torch.randn(5, 7, 11)
    for temperature in (1.0, 0.7):
        p = torch.softmax(logits / temperature, -1)
        assert torch.allclose(tsec.token_entropy(logits, temperature), -(p * p.log()).sum(-1), atol=1e-6)
    assert math.isclose(tsec.token_entropy(torch.zeros(50)).item(), math.log(50), rel_tol=1e-6)
    assert tsec.token_entropy(torch.tensor([0.0, 1e4, 0.0])).item() < 1e-6


def test_tsec_select_band_keeps_exactly_the_middle_third():
    entropy = torch.tensor([[5., 1., 9., 3., 7., 2., 8., 4., 6., 0., 0., 0.]])
    mask = torch.tensor([[1] * 9 + [0] * 3])
    selected = tsec.select_band(entropy, mask)
    assert sorted(entropy[selected].tolist()) == [4., 5., 6.]  # ranks 3, 4, 5 of 9
    assert not selected[0, 9:].any()  # padding is never selected, even when its value would rank in band
    everything = tsec.select_band(entropy, mask, band=(0.0, 1.0))
    assert everything.equal(mask.bool())


def test_tsec_select_band_ranks_within_groups():
    entropy = torch.tensor([[1., 2., 3.], [4., 5., 6.], [10., 20., 30.], [40., 50., 60.]])
    mask = torch.ones(4, 3)
    per_group = tsec.select_band(entropy, mask, group_size=2)
    assert entropy[per_group].tolist() == [3., 4., 30., 40.]  # 6 tokens per group: ranks 2 and 3
    per_response = tsec.select_band(entropy, mask, group_size=None)
    assert entropy[per_response].tolist() == [2., 5., 20., 50.]
    assert tsec.selective_entropy(entropy, per_response).item() == pytest.approx((2 + 5 + 20 + 50) / 4)
    # the objective averages per response first: a response with 1 token counts as much as one with 3
    sel = torch.tensor([[True, True, True], [True, False, False], [False] * 3, [False] * 3])
    assert tsec.selective_entropy(entropy, sel).item() == pytest.approx((2 + 4) / 2)


# ----------------------------------------------------------------------------- egas.py

def test_egas_pgd_ascends_a_linear_objective_within_the_ball_and_grid():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 28, 28)).float() / 255
    w = torch.randn(3, 28, 28)
    objective = lambda img: (img * w).sum()
    for steps, alpha, eps in [(1, 2 / 255, 2 / 255), (3, 1 / 255, 2 / 255), (2, -3 / 255, 6 / 255)]:
        x_adv = egas.pgd(objective, x, steps, alpha, eps)
        assert (x_adv - x).abs().max().item() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert torch.allclose(x_adv * 255, (x_adv * 255).round(), atol=1e-4)  # still an 8-bit image
        expected = (x + w.sign() * min(abs(alpha) * steps, eps) * math.copysign(1, alpha)).clamp(0, 1)
        assert torch.allclose(x_adv, (expected * 255).round() / 255, atol=1e-6)
        gain = objective(x_adv) - objective(x)
        assert gain > 0 if alpha > 0 else gain < 0


def _clean_rollouts(policy, tok, images, n, max_new_tokens=40, seed=0):
    prompts = [data.build_prompt(tok, "<image>How many sides?", data.n_image_tokens(x)) for x in images]
    torch.manual_seed(seed)
    return model_lib.sample(policy, tok, prompts, images, n, max_new_tokens)


def test_egas_attack_raises_selected_entropy_on_tiny_model(tiny, geo3k):
    policy, tok = tiny
    images = [data.load_image(row["images"][0], 56 * 56, 112 * 112) for row in geo3k]
    n = 4
    out = _clean_rollouts(policy, tok, images, n)
    P = out["prompt_ids"].shape[1]
    gains, descents = [], []
    for i, x in enumerate(images):
        rows = slice(i * n, (i + 1) * n)
        ids = torch.cat([out["prompt_ids"][rows], out["response_ids"][rows]], 1)
        attn = torch.cat([out["prompt_mask"][rows], out["response_mask"][rows]], 1)
        x_adv, st = egas.attack(policy, x, ids, attn, out["response_mask"][rows], P, steps=1, alpha=2 / 255, eps=2 / 255)
        assert (x_adv - x).abs().max() <= 2 / 255 + 1e-6 and not torch.equal(x_adv, x)
        gains.append(st["gain"])
        _, st_down = egas.attack(policy, x, ids, attn, out["response_mask"][rows], P, steps=1, alpha=-2 / 255, eps=2 / 255)
        descents.append(st_down["gain"])
        assert st["objective_clean"] == pytest.approx(st_down["objective_clean"], abs=1e-5)  # same tokens, same image
    assert all(p.grad is None for p in policy.parameters())  # the attack never creates parameter gradients
    assert sum(g > 0 for g in gains) >= 5, gains  # ascent raises the TsEC objective for most prompts
    assert sum(g < 0 for g in descents) >= 5, descents  # and the opposite sign lowers it


def test_egas_attack_objective_is_the_band_mean_of_clean_entropy(tiny):
    policy, tok = tiny
    x = torch.rand(3, 56, 56)
    n = 3
    out = _clean_rollouts(policy, tok, [x], n, seed=1)
    P = out["prompt_ids"].shape[1]
    ids = torch.cat([out["prompt_ids"], out["response_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["response_mask"]], 1)
    _, st = egas.attack(policy, x, ids, attn, out["response_mask"], P, steps=0, alpha=0.0, eps=0.0)
    pv, grid = data.image_to_pixels(x)
    with torch.no_grad():  # straightforward recomputation with full logits
        logits = policy(input_ids=ids, attention_mask=attn, pixel_values=pv.repeat(n, 1), image_grid_thw=grid.repeat(n, 1),
                        mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits
    entropy = tsec.token_entropy(logits[:, P - 1:-1]) * out["response_mask"]
    selected = tsec.select_band(entropy, out["response_mask"], group_size=n)
    assert st["objective_clean"] == pytest.approx(tsec.selective_entropy(entropy, selected).item(), abs=1e-5)
    assert st["gain"] == pytest.approx(0.0, abs=1e-6)


def test_egas_attack_falls_back_to_all_tokens_when_the_band_is_empty(tiny):
    policy, tok = tiny
    x = torch.rand(3, 56, 56)
    prompt = data.build_prompt(tok, "<image>q", data.n_image_tokens(x))
    response = tok("7<|im_end|>").input_ids  # 2 tokens: round(2/3) == round(4/3), so the middle band is empty
    ids = torch.tensor([prompt + response])
    mask = torch.ones(1, len(response), dtype=torch.long)
    _, st = egas.attack(policy, x, ids, torch.ones_like(ids), mask, len(prompt), steps=1, alpha=2 / 255, eps=2 / 255)
    assert st["fallback"] == 1
    pv, grid = data.image_to_pixels(x)
    with torch.no_grad():
        logits = policy(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                             mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits[:, len(prompt) - 1:-1]
    assert st["objective_clean"] == pytest.approx(tsec.token_entropy(logits).mean().item(), abs=1e-5)
    assert math.isfinite(st["gain"])


# ----------------------------------------------------------------------------- grpo.py

def test_grpo_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.1, 0.1, 0.1])
    adv = grpo.group_advantages(rewards, 4)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased: divide by n - 1
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert adv[4:8].eq(0).all()  # a dead group: equal rewards give exactly zero, never NaN
    mean, std3 = 1.3 / 4, torch.tensor([1.0, 0.1, 0.1, 0.1]).std().item()
    assert adv[8].item() == pytest.approx((1.0 - mean) / (std3 + 1e-6), rel=1e-5)
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.ones(4), 1)


def test_grpo_policy_loss_clips_both_sides_hand_computed():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))  # ratios 1.5, 0.5, 1.1, 0.5
    mask = torch.tensor([[1, 1, 1, 0]])
    # A > 0: ratio 1.5 is clipped to 1.2; A < 0 on a per-token advantage: ratio 0.5 is clipped to 0.8
    adv = torch.tensor([[2.0, -1.0, 2.0, 5.0]])
    loss, stats = grpo.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    expected = (-2.0 * 1.2 + 1.0 * 0.8 - 2.0 * 1.1) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clipped_tokens"] == 2 and stats["tokens"] == 3
    # the clipped side carries no gradient; the unclipped token's gradient is -A * ratio / n
    logp = logp.clone().requires_grad_(True)
    grpo.policy_loss(logp, old, adv, mask)[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -2.0 * 1.1 / 3, 0.0]]), atol=1e-6)
    # asymmetric clip ("clip-higher"): 1.5 is now inside [0.8, 1.6]
    loss_hi, _ = grpo.policy_loss(logp.detach(), old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert loss_hi.item() == pytest.approx((-2.0 * 1.5 + 1.0 * 0.8 - 2.0 * 1.1) / 3, rel=1e-6)


def test_grpo_token_mean_is_unchanged_by_micro_batching():
    torch.manual_seed(0)
    logp, old = torch.randn(6, 9) * 0.3, torch.randn(6, 9) * 0.3
    mask = (torch.rand(6, 9) > 0.3).long()
    adv = torch.randn(6)
    full, _ = grpo.policy_loss(logp, old, adv, mask)
    n = mask.sum()
    split = sum(grpo.policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], n_tokens=n)[0] for i in range(0, 6, 2))
    assert split.item() == pytest.approx(full.item(), rel=1e-6)
    # not a mean of per-micro-batch means (which would weight short micro-batches more)
    means = sum(grpo.policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2])[0] for i in range(0, 6, 2)) / 3
    assert abs(means.item() - full.item()) > 1e-4


def test_grpo_chunked_logprobs_equal_full_logits_values_and_gradients():
    torch.manual_seed(0)
    B, L, D, V = 3, 7, 16, 50
    lm_head = torch.nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, L, D, requires_grad=True)
    targets = torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    logp, ent = grpo.token_logprobs(hidden, lm_head, targets, mask, temperature=0.8, chunk_size=4)
    logits = lm_head(hidden) / 0.8
    ref_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    ref_ent = tsec.token_entropy(logits) * mask
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    (g,) = torch.autograd.grad((logp * 1.3 + ent).sum(), hidden)
    (g_ref,) = torch.autograd.grad((ref_logp * 1.3 + ref_ent).sum(), hidden)
    assert torch.allclose(g, g_ref, atol=1e-5)
    assert g[1, 4:].abs().sum() == 0  # padding receives no gradient


def test_grpo_kl_penalty():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert grpo.kl_penalty(logp, logp).abs().max() == 0
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = ref - logp
    assert torch.allclose(grpo.kl_penalty(logp, ref), d.exp() - d - 1)
    assert (grpo.kl_penalty(logp, ref) >= 0).all()

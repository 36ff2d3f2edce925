import pytest
import torch

import bench
import data
import egas
import grpo
import model as model_lib
import tsec


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on cores shared with other jobs, waiting OpenMP threads make these tests 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rollouts():
    """The tiny policy and 3 sampled responses for each of two prompts of different lengths (so the shorter
    prompt's rows are left-padded)."""
    policy, tok = model_lib.load_policy("tiny", seed=0)
    policy.eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 56, 84), generator=g).float() / 255 for _ in range(2)]
    prompts = [data.build_prompt(tok, q, data.n_image_tokens(x))
               for q, x in zip(["<image>How many sides?", "<image>Area?"], images)]
    torch.manual_seed(0)
    out = model_lib.sample(policy, tok, prompts, images, 3, max_new_tokens=30)
    return policy, images, out


def _rows(out, i, n=3):
    rows = slice(i * n, (i + 1) * n)
    ids = torch.cat([out["prompt_ids"][rows], out["response_ids"][rows]], 1)
    attn = torch.cat([out["prompt_mask"][rows], out["response_mask"][rows]], 1)
    return ids, attn, out["response_mask"][rows]


def test_egas_shared_prompt_hidden_equals_response_hidden(rollouts):
    policy, images, out = rollouts
    P = out["prompt_ids"].shape[1]
    assert (out["prompt_mask"][3:] == 0).any()  # the second prompt is left-padded
    for i, x in enumerate(images):
        ids, attn, mask = _rows(out, i)
        pv, grid = data.image_to_pixels(x)
        with torch.no_grad():
            ref = model_lib.response_hidden(policy, ids, attn, pv.repeat(3, 1), grid.repeat(3, 1), P)
            ours = egas.shared_prompt_hidden(policy, ids, attn, pv, grid, P)
        valid = mask.bool()
        assert (ours - ref)[valid].abs().max() < 1e-5
    two_prompts = torch.cat([_rows(out, 0)[0][:1], _rows(out, 1)[0][:1]])
    with pytest.raises(ValueError, match="share one prompt"):
        egas.shared_prompt_hidden(policy, two_prompts, torch.ones_like(two_prompts), pv, grid, P)


@pytest.mark.parametrize("scope,temperature,chunk_size", [("group", 1.0, 1024), ("response", 0.7, 5)])
def test_egas_memory_bounded_objective_and_image_gradient_equal_full_logits(rollouts, scope, temperature, chunk_size):
    policy, images, out = rollouts
    P = out["prompt_ids"].shape[1]
    for i, x in enumerate(images):
        ids, attn, mask = _rows(out, i)
        objective, state = egas.tsec_objective(policy, ids, attn, mask, P, scope=scope, temperature=temperature,
                                               chunk_size=chunk_size)
        img = x.clone().requires_grad_(True)
        value = objective(img)
        (grad,) = torch.autograd.grad(value, img)
        img_ref = x.clone().requires_grad_(True)
        value_ref = bench.full_logits_objective(policy, img_ref, ids, attn, mask, P, scope=scope,
                                                temperature=temperature)
        (grad_ref,) = torch.autograd.grad(value_ref, img_ref)
        assert state["fallback"] == 0 and 0 < state["selected"].sum() < mask.sum()
        assert abs(value.item() - value_ref.item()) < 1e-5
        assert grad_ref.abs().max() > 1e-6 and grad.norm() > 0.5 * grad_ref.norm()  # not a vanishing gradient
        assert (grad - grad_ref).abs().max() < 1e-5
        assert (grad - grad_ref).norm() / grad_ref.norm() < 1e-4  # relative: the gradients are small
    assert all(p.grad is None for p in policy.parameters())


def test_grpo_fused_logprobs_weight_gradient_and_detached_weight():
    torch.manual_seed(0)
    B, L, D, V = 2, 9, 8, 300
    lm_head = torch.nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, L, D, requires_grad=True)
    targets, mask = torch.randint(0, V, (B, L)), torch.ones(B, L, dtype=torch.long)
    mask[0, 6:] = 0
    logp, ent = grpo.token_logprobs(hidden, lm_head, targets, mask, temperature=0.9, chunk_size=4)
    g_h, g_w = torch.autograd.grad((logp * 0.5 - ent).sum(), [hidden, lm_head.weight])
    logits = lm_head(hidden) / 0.9
    ref_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    ref_ent = tsec.token_entropy(logits) * mask
    r_h, r_w = torch.autograd.grad((ref_logp * 0.5 - ref_ent).sum(), [hidden, lm_head.weight])
    assert torch.allclose(g_h, r_h, atol=1e-5) and torch.allclose(g_w, r_w, atol=1e-5)
    # the attack passes the weight detached: the hidden gradient is the same and no weight gradient exists
    _, ent2 = grpo.token_logprobs(hidden, lm_head.weight.detach(), targets, mask, temperature=0.9, chunk_size=4)
    (g_h2,) = torch.autograd.grad(-ent2.sum(), hidden)
    (r_h2,) = torch.autograd.grad(-tsec.token_entropy(lm_head(hidden) / 0.9).mul(mask).sum(), hidden)
    assert torch.allclose(g_h2, r_h2, atol=1e-5) and lm_head.weight.grad is None


def test_grpo_bench_quick_configuration_runs():
    rows = bench.main(quick=True)
    measured = {(r[0], r[1].split(" (")[0].split(",")[0]) for r in rows}
    assert {("tiny", "step time"), ("tiny", "rollout tokens/s"), ("tiny-152k", "attack peak memory"),
            ("tiny-152k", "attack time")} <= measured
    step = next(r for r in rows if r[1].startswith("step time"))
    assert float(step[4]) > 0
    memory = next(r for r in rows if r[1].startswith("attack peak memory"))
    assert float(memory[2]) < float(memory[3])  # ours below the full-logits version even at 16 tokens

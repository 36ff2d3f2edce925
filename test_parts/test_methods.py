"""The related methods kept as constants (DESIGN §7): NoisyRollout's noise, VEPO and 80/20 token selection, and
the TsEC ablations, each on hand-computed numbers and in one real training step."""
import csv
import json
import math
import os

import pytest
import torch

import egas
import train
import vepo

GEO3K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "geometry3k-sample",
                     "test.parquet")
SMALL = ["--model", "tiny", "--dataset", GEO3K, "--min_pixels", "3136", "--max_pixels", "12544",
         "--max_response_len", "24", "--batch_size", "2", "--n_clean", "2", "--n_adv", "2", "--eval_limit", "2",
         "--max_steps", "1"]
sigmoid = lambda z: 1 / (1 + math.exp(-z))


# ----------------------------------------------------------------------------- egas.py: NoisyRollout's noise

def test_egas_noise_level_anneals_by_a_sigmoid_of_the_step():
    # k = floor(500 * (1 - sigmoid(30 * (step / max_steps - 2/3))))
    assert egas.noise_level(1, 60) == 499   # 500 * (1 - sigmoid(-19.5)) = 499.999998
    assert egas.noise_level(30, 60) == 496  # 500 * (1 - sigmoid(-5)) = 496.65
    assert egas.noise_level(40, 60) == 250  # the midpoint, 2/3 of the run: sigmoid(0) = 1/2
    assert egas.noise_level(45, 60) == 37   # 500 * (1 - sigmoid(2.5)) = 37.93
    assert egas.noise_level(60, 60) == 0    # 500 * (1 - sigmoid(10)) = 0.023
    assert [egas.noise_level(s, 3) for s in (1, 2, 3)] == [499, 250, 0]


def test_egas_noise_alpha_bar_is_the_sigmoid_beta_schedule():
    abar = egas.alpha_bar()
    beta = lambda i: 1e-5 + (5e-3 - 1e-5) * sigmoid(-6 + 12 * i / 999)  # beta_i, linear-in-sigmoid over 1000 steps
    assert abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - beta(0), rel=1e-12)  # beta_0 = 2.2338e-5
    assert abar[1].item() == pytest.approx((1 - beta(0)) * (1 - beta(1)), rel=1e-12)
    assert beta(999) == pytest.approx(4.98766e-3, rel=1e-5)
    assert (abar[1:] < abar[:-1]).all()  # more steps, less signal
    assert abar[499].item() == pytest.approx(math.prod(1 - beta(i) for i in range(500)), rel=1e-9)


def test_egas_noise_image_matches_the_forward_process():
    torch.manual_seed(0)
    x = torch.full((3, 224, 224), 0.5)
    k = 250
    abar = egas.alpha_bar()[k].item()
    x_k = egas.add_noise(x, k)
    assert x_k.shape == x.shape and x_k.min() >= 0 and x_k.max() <= 1
    assert torch.equal(x_k, (x_k * 255).round() / 255)  # still an 8-bit image
    # 0.5 sits 3.4 noise stds from either clip, so mean and std are the forward process's (up to the 1/255 grid)
    assert x_k.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=2e-3)
    assert x_k.std().item() == pytest.approx(math.sqrt(1 - abar), rel=2e-2)
    assert (egas.add_noise(x, 0) - x).abs().mean() < (x_k - x).abs().mean() / 10  # k = 0: almost clean


# ----------------------------------------------------------------------------- vepo.py

def test_vepo_jsd_symmetric_zero_on_equal_and_bounded_by_ln2():
    torch.manual_seed(0)
    logp, logq = torch.log_softmax(3 * torch.randn(2, 5, 50), -1), torch.log_softmax(3 * torch.randn(2, 5, 50), -1)
    d = vepo.jsd(logp, logq)
    assert d.shape == (2, 5)
    assert torch.allclose(d, vepo.jsd(logq, logp), atol=1e-7)
    assert vepo.jsd(logp, logp).abs().max() < 1e-6
    assert (d > 0).all() and (d <= math.log(2) + 1e-6).all()
    # hand-computed: p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4), JSD = (KL(p||m) + KL(q||m)) / 2 = 3/4 ln(4/3)
    p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([1.0, 0.0]).log()
    assert vepo.jsd(p, q).item() == pytest.approx(0.75 * math.log(4 / 3), rel=1e-6)
    # disjoint supports reach the bound exactly
    assert vepo.jsd(torch.tensor([0.0, -math.inf]), torch.tensor([-math.inf, 0.0])).item() == pytest.approx(math.log(2))


def test_vepo_token_jsd_chunked_equals_full_logits():
    torch.manual_seed(0)
    B, L, D, V = 3, 7, 16, 40
    h, hn, w = torch.randn(B, L, D), torch.randn(B, L, D), torch.randn(V, D)
    mask = (torch.arange(L)[None] < torch.tensor([[7], [4], [1]])).long()
    jsd, ent_noisy = vepo.token_jsd(h, hn, w, mask, temperature=0.7, chunk_size=3)
    logp, logq = torch.log_softmax(h @ w.T / 0.7, -1), torch.log_softmax(hn @ w.T / 0.7, -1)
    assert torch.allclose(jsd, vepo.jsd(logp, logq) * mask, atol=1e-6)
    assert torch.allclose(ent_noisy, -(logq.exp() * logq).sum(-1) * mask, atol=1e-5)


def test_vepo_score_hand_computed_and_normalized_per_response():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    jsd = torch.tensor([[0.0, 0.2, 0.4, 0.1, 9.0], [0.0, 0.2, 0.4, 0.1, 0.2]])
    entropy = torch.tensor([[1.0, 3.0, 2.0, 5.0, 9.0], [1.0, 3.0, 2.0, 5.0, 1.0]])
    gap = torch.tensor([[0.5, -1.0, 0.0, 0.25, 9.0], [0.5, -1.0, 0.0, 0.25, 0.0]])  # H_noisy - H, sign ignored
    s = vepo.score(jsd, entropy, gap, mask)
    # row 0: j = (0, .5, 1, .25), h = (0, .5, .25, 1), |g| = (.5, 1, 0, .25); s = (1 - (1-j)^.7 (1-|g|)^.3) h
    #   t0: h = 0 -> 0;  t1: (1-|g|) = 0 -> h = .5;  t2: (1-j) = 0 -> h = .25;  t3: 1 - .75^.7 .75^.3 = .25, h = 1
    assert torch.allclose(s[0], torch.tensor([0.0, 0.5, 0.25, 0.25, 0.0]), atol=1e-6)  # padding scores 0
    # row 1: the same four tokens and a fifth (j = .5, h = 0); min-max is per response, so the four score the same
    assert s[1, 4].item() == 0.0 and torch.allclose(s[1, :4], s[0, :4], atol=1e-6)
    # top 20% per response: ceil(0.2 * 4) = 1 and ceil(0.2 * 5) = 1 token, the highest score
    assert vepo.top_fraction(s, mask).tolist() == [[False, True, False, False, False]] * 2


def test_vepo_top_fraction_keeps_ceil_20_percent_per_response():
    lengths = torch.tensor([5, 15, 1, 0, 24])
    mask = torch.arange(24)[None] < lengths[:, None]
    assert vepo.n_top(mask).tolist() == [1, 3, 1, 0, 5]
    torch.manual_seed(0)
    values = torch.randn(5, 24)
    kept = vepo.top_fraction(values, mask)
    assert kept.sum(1).tolist() == [1, 3, 1, 0, 5] and not (kept & ~mask).any()
    for row in range(5):  # every kept token beats every valid dropped one
        if kept[row].any() and (mask[row] & ~kept[row]).any():
            assert values[row][kept[row]].min() > values[row][mask[row] & ~kept[row]].max()


@pytest.mark.parametrize("pg_tokens", ["vepo", "top_entropy"])
def test_train_selected_tokens_loss_is_the_mean_over_the_top_20_percent(pg_tokens):
    # with pi_old = pi every ratio is 1, so the loss is -sum_r A_r k_r / sum_r k_r, k_r = ceil(0.2 * len_r)
    from model import load_policy
    policy, _ = load_policy("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    B, P, L = 4, 12, 10
    prompt = torch.randint(10, 100, (B, P), generator=g)
    prompt[:, 2:6] = policy.config.image_token_id  # one 56x56 image: 4 merged tokens
    lengths = torch.tensor([10, 6, 3, 1])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    rollouts = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), response_mask=mask,
                    response_ids=torch.randint(10, 100, (B, L), generator=g) * mask)
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    cfg = type("Config", (), dict(train.DEFAULTS, device="cpu", micro_batch_size=3, pg_tokens=pg_tokens))
    images = [torch.rand(3, 56, 56, generator=g) for _ in range(B)]
    totals, entropy = train.policy_update(policy, None, rollouts, advantages, images, cfg, 1,
                                          lambda: torch.autocast("cpu", enabled=False))
    k = torch.tensor([2.0, 2.0, 1.0, 1.0])
    assert totals["tokens"] == 6
    assert totals["loss"] == pytest.approx(-(advantages * k).sum().item() / 6, abs=1e-6)
    if pg_tokens == "top_entropy":  # the two highest-entropy tokens of the first response, and so on
        top = sum(entropy[r].topk(int(k[r])).values.sum().item() for r in range(B))
        assert totals["pg_entropy"] == pytest.approx(top, rel=1e-5)
    else:
        assert totals["jsd"] > 0


# ----------------------------------------------------------------------------- train.py: one step of each method

def _run(tmp_path, *args):
    train.main(SMALL + list(args) + ["--out_dir", str(tmp_path)])
    return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


def test_train_grpo_samples_only_clean_rollouts(tmp_path):
    (log,) = _run(tmp_path, "--n_clean", "4", "--n_adv", "0")
    assert "entropy_adv" not in log and "attack_gain" not in log and "noise_k" not in log
    assert log["entropy"] == pytest.approx(log["entropy_clean"])


def test_train_noisyrollout_anneals_the_noise(tmp_path):
    logs = _run(tmp_path, "--perturb", "noise", "--max_steps", "3")
    assert [l["noise_k"] for l in logs] == [499, 250, 0]
    assert all("attack_gain" not in l and "entropy_adv" in l for l in logs)


@pytest.mark.parametrize("args", [[], ["--tsec_band=(0.0, 1.0)"], ["--tsec_scope", "response"]],
                         ids=["saei", "no_tsec", "per_response"])
def test_train_saei_and_its_tsec_ablations_raise_the_entropy(tmp_path, args):
    (log,) = _run(tmp_path, *args)
    assert log["attack_gain"] > 0 and log["tsec_fallback"] == 0


def test_train_saei_descending_sign_lowers_the_entropy(tmp_path):
    (log,) = _run(tmp_path, f"--pgd_alpha={-2 / 255}")
    assert log["attack_gain"] < 0


@pytest.mark.parametrize("args", [["--n_clean", "4", "--n_adv", "0"], []], ids=["vepo", "saei_vepo"])
def test_train_vepo_alone_and_with_saei(tmp_path, args):
    (log,) = _run(tmp_path, "--pg_tokens", "vepo", *args)
    assert 0 < log["vepo_jsd"] <= math.log(2)
    assert ("attack_gain" in log) == (args == [])  # VEPO selects tokens; SaEI still attacks the image


def test_train_top_entropy_updates_higher_entropy_tokens(tmp_path):
    (log,) = _run(tmp_path, "--pg_tokens", "top_entropy")
    assert log["pg_entropy"] > log["entropy_clean"] and log["pg_entropy"] > log["entropy_adv"]


# ----------------------------------------------------------------------------- compare.py

def test_compare_table_from_finished_runs(tmp_path):
    import compare
    # two finished seeds of two methods, as train.py leaves them: compare.py reuses them instead of training
    finals = {("grpo", 0): 0.5, ("grpo", 1): 0.7, ("saei", 0): 0.6, ("saei", 1): 0.6}
    for (method, seed), final in finals.items():
        path = tmp_path / method / f"seed{seed}"
        path.mkdir(parents=True)
        (path / "train.log").write_text(f"held-out greedy accuracy: 0.300 before -> {final:.3f} after (format ...)\n")
        logs = [{"step": 1, "entropy": 1.0 + seed, "answer_diversity": 2.0},
                {"step": 2, "entropy": 3.0 + seed, "answer_diversity": 4.0, "eval_accuracy": final}]
        (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in logs))
    compare.main([f"--out_dir={tmp_path}", "--methods=grpo,saei", "--seeds=2", "--steps=2", "--smooth=2"])
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert float(rows["grpo"]["final_accuracy"]) == pytest.approx(0.6)
    assert float(rows["grpo"]["final_accuracy_std"]) == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert float(rows["saei"]["final_accuracy_std"]) == 0.0
    assert float(rows["saei"]["rollout_entropy"]) == pytest.approx(2.5)  # mean over steps, then over seeds
    assert float(rows["saei"]["answer_diversity"]) == pytest.approx(3.0)
    assert "| grpo | 2 | 0.300 | 0.600 ± 0.141 |" in (tmp_path / "results.md").read_text()
    curves = (tmp_path / "curves.csv").read_text().splitlines()
    assert "grpo,accuracy,0,0.3" in curves  # the accuracy before training is the curve's step 0
    assert "grpo,entropy,2,2.5" in curves  # seed means 1.5 and 3.5 at steps 1 and 2, averaged over the 2-step window

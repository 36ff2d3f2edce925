import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEO3K = os.path.join(ROOT, "..", "shared", "data", "geometry3k-sample", "test.parquet")
SMALL = ["--model", "tiny", "--dataset", GEO3K, "--min_pixels", "3136", "--max_pixels", "12544",
         "--max_response_len", "24", "--batch_size", "2", "--n_clean", "2", "--n_adv", "2", "--eval_limit", "2"]


# ----------------------------------------------------------------------------- configurator.py / train.py config

@pytest.mark.parametrize("args,message", [
    (["--n_clen=6"], "unknown constant 'n_clen'"),
    (["--n_clean=six"], "n_clean must be int"),
    (["--tsec_band=0.3"], "tsec_band must be tuple"),
    (["--perturb=blur"], "perturb must be one of"),
    (["--n_clean"], "needs a value"),
    (["config/no_such_file.py"], "not found"),
    (["--model", "Qwen9-VL"], "unknown model 'Qwen9-VL'"),
])
def test_train_bad_configuration_is_one_clear_line(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(args + ["--out_dir", str(tmp_path)])


def test_configurator_parses_types_and_files(tmp_path):
    from configurator import override
    defaults = {"lr": 1e-6, "n_adv": 6, "tsec_band": (1 / 3, 2 / 3), "model": "tiny", "resume": False}
    conf = tmp_path / "c.py"
    conf.write_text("lr = 3e-4\nn_adv = 0\n")
    cfg = override(defaults, [str(conf), "--tsec_band=(0.0, 1.0)", "--model", "Qwen2.5-VL-3B", "--resume=True", "--lr=1"])
    assert cfg == {"lr": 1.0, "n_adv": 0, "tsec_band": (0.0, 1.0), "model": "Qwen2.5-VL-3B", "resume": True}
    assert isinstance(cfg["lr"], float)


# ----------------------------------------------------------------------------- train.py under torchrun

UPDATE_SCRIPT = textwrap.dedent("""
    # Same fixed rollouts on 1 rank or split over 2: the token-mean loss and the gradients must agree.
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import train
    from model import load_policy
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = type("Config", (), dict(train.DEFAULTS, device="cpu", micro_batch_size=3))
    rank, world = train.setup_distributed(cfg)
    policy, tok = load_policy("tiny", seed=0)
    policy.model.visual.requires_grad_(False)
    if world > 1:
        train.shard(policy, torch.float32)
    g = torch.Generator().manual_seed(0)
    B, P, L = 8, 30, 12
    image_tokens = 4  # a 56x56 image: 16 patches, 4 merged tokens
    prompt = torch.randint(10, 100, (B, P), generator=g)
    prompt[:, 5:5 + image_tokens] = policy.config.image_token_id
    response = torch.randint(10, 100, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    response_mask = (torch.arange(L)[None] < lengths[:, None]).long()
    images = [torch.rand(3, 56, 56, generator=g) for _ in range(B)]
    advantages = torch.randn(B, generator=g)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    rollouts = dict(prompt_ids=prompt[rows], prompt_mask=torch.ones_like(prompt[rows]),
                    response_ids=response[rows] * response_mask[rows], response_mask=response_mask[rows])
    totals, _ = train.policy_update(policy, None, rollouts, advantages[rows], images[rows], cfg, world,
                                    lambda: torch.autocast("cpu", enabled=False))
    loss = train.all_reduce_sum(torch.tensor(totals["loss"])).item()
    grads = {{}}
    for name, p in policy.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.clone()
    # one optimizer step; then every rank gathers the full weights and reports a checksum of them
    torch.optim.AdamW(policy.parameters(), lr=1e-2).step()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    train.reshard(policy) if world > 1 else None
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    checksum = sum(v.double().abs().sum().item() * (i + 1) for i, v in enumerate(full.values()))
    checksums = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(checksums, checksum)
    else:
        checksums = [checksum]
    if rank == 0:
        torch.save({{"loss": loss, "grads": grads, "tokens": totals["tokens"], "checksums": checksums}}, sys.argv[1])
    if world > 1:
        torch.distributed.destroy_process_group()
""")


def _torchrun(args, nproc=2, timeout=300):
    import socket
    with socket.socket() as s:  # a free port, so parallel runs never meet at the default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_two_ranks_loss_and_gradients_equal_one_rank(tmp_path):
    script = tmp_path / "update.py"
    script.write_text(UPDATE_SCRIPT.format(root=ROOT))
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun([str(script), str(tmp_path / "two.pt")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["tokens"] == b["tokens"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    assert not any(k.startswith("model.visual") for k in a["grads"])  # the frozen vision tower gets no gradient
    worst = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
    scale = max(a["grads"][k].abs().max().item() for k in a["grads"])
    assert scale > 1e-4 and worst < 1e-5 * max(1.0, scale), (worst, scale)
    # after the step every rank holds the same weights, and they match the single-process step
    assert len(b["checksums"]) == 2 and b["checksums"][0] == b["checksums"][1]
    assert b["checksums"][0] == pytest.approx(a["checksums"][0], rel=1e-6)


def test_train_torchrun_two_ranks_runs_saei_steps(tmp_path):
    run = _torchrun(["train.py"] + SMALL + ["--max_steps=2", "--batch_size=4", "--out_dir", str(tmp_path)])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [1, 2]  # rank 0 alone writes the log
    assert all("attack_gain" in l and l["response_len"] > 0 for l in logs)
    from model import load_policy
    policy, _ = load_policy(str(tmp_path / "checkpoint"))
    assert sum(p.numel() for p in policy.parameters()) > 1e6  # the whole model, gathered from both shards


def _weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "checkpoint", "model.safetensors"))


def test_train_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    import signal
    import time
    # entropy_coef gives every step a gradient even when all rewards tie, so Adam's moments matter
    args = SMALL + ["--entropy_coef=0.05", "--lr=1e-3", "--save_interval=100", "--max_steps=4"]
    train.main(args + ["--out_dir", str(tmp_path / "straight")])
    # a real SIGTERM in the middle of the run: the step finishes, a checkpoint is written, the process exits 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py"] + args + ["--max_steps=100", "--out_dir", str(tmp_path / "killed")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM" in out
    stopped_at = torch.load(tmp_path / "killed" / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 1 <= stopped_at < 4 and logged[-1] == stopped_at
    train.main(args + ["--resume=True", "--out_dir", str(tmp_path / "killed")])
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # no step repeated or skipped
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def _fixed_rollouts(policy, B=4, P=30, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, 100, (B, P), generator=g)
    prompt[:, 5:9] = policy.config.image_token_id  # a 56x56 image: 4 merged tokens
    response_mask = (torch.arange(L)[None] < torch.randint(3, L + 1, (B,), generator=g)[:, None]).long()
    rollouts = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt),
                    response_ids=torch.randint(10, 100, (B, L), generator=g) * response_mask, response_mask=response_mask)
    return rollouts, [torch.rand(3, 56, 56, generator=g) for _ in range(B)], torch.randn(B, generator=g)


def test_train_gradient_checkpointing_and_micro_batching_leave_gradients_unchanged():
    from model import load_policy
    grads = []
    for checkpointing, micro in [(False, 4), (True, 4), (False, 1)]:
        policy, _ = load_policy("tiny", seed=0)
        policy.model.visual.requires_grad_(False)
        if checkpointing:
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy.train()
        assert policy.is_activation_checkpointing == checkpointing
        cfg = type("Config", (), dict(train.DEFAULTS, device="cpu", micro_batch_size=micro))
        rollouts, images, advantages = _fixed_rollouts(policy)
        train.policy_update(policy, None, rollouts, advantages, images, cfg, 1, lambda: torch.autocast("cpu", enabled=False))
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 1e-4
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_train_non_finite_update_is_skipped_not_applied():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    norm, applied = train.optimizer_step(optimizer, [w], 1.0, loss=0.5)
    assert not applied and not math.isfinite(norm) and torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    w.grad = torch.tensor([1.0, 1.0, 0.0])
    _, applied = train.optimizer_step(optimizer, [w], 1.0, loss=float("inf"))
    assert not applied and torch.equal(w.detach(), torch.ones(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    norm, applied = train.optimizer_step(optimizer, [w], 1.0, loss=0.5)
    assert applied and norm == pytest.approx(5.0) and not torch.equal(w.detach(), torch.ones(3))


def test_train_hub_model_while_offline_is_one_clear_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "train.py", "--model", "Qwen2.5-VL-3B", "--max_steps=1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in last and "HF_HUB_OFFLINE" in last and "Traceback" not in run.stderr


@pytest.mark.parametrize("method", [[], ["--n_clean=4", "--n_adv=0"]], ids=["saei", "grpo"])
def test_train_two_steps_write_metrics_and_a_loadable_checkpoint(method, tmp_path):
    import eval as evaluation
    from model import load_policy
    # the random tiny model never boxes an answer: every group is dead, so GRPO alone must not move the weights...
    base = SMALL + method + ["--max_steps=2", "--weight_decay=0.0", "--lr=1e-2"]
    train.main(base + ["--out_dir", str(tmp_path / "dead")])
    initial = load_policy("tiny", seed=0)[0].state_dict()
    dead = load_policy(str(tmp_path / "dead" / "checkpoint"))[0].state_dict()
    assert all(torch.equal(dead[k], initial[k]) for k in dead)
    # ...while a signal through the same update path (an entropy bonus) does
    train.main(base + ["--entropy_coef=0.1", "--out_dir", str(tmp_path / "live")])
    live = load_policy(str(tmp_path / "live" / "checkpoint"))[0].state_dict()
    changed = [k for k in live if not torch.equal(live[k], initial[k])]
    assert changed and not any(k.startswith("model.visual") for k in changed)  # the vision tower stays frozen
    logs = [json.loads(line) for line in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [1, 2]
    keys = {"reward_clean", "accuracy_clean", "format", "entropy_clean", "dead_groups", "response_len", "clip_frac",
            "grad_norm", "t_generate", "t_attack", "t_update"}
    assert all(keys <= set(l) for l in logs) and all(l["dead_groups"] == 1.0 for l in logs)
    assert all(("attack_gain" in l) == (method == []) for l in logs)  # n_adv=0 runs no attack at all
    rows = evaluation.main(["--model", str(tmp_path / "live" / "checkpoint"), "--benchmarks", GEO3K,
                            "--limit", "2", "--max_response_len", "8", "--min_pixels", "3136", "--max_pixels", "12544",
                            "--max_prompt_len", "4096", "--out_dir", str(tmp_path / "eval")])
    assert rows[0]["problems"] == 2

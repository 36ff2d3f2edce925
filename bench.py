"""How fast and how big: SaEI against GRPO on this machine's CPU, printed as one markdown table.

    python bench.py            # the full table (about 15 minutes)
    python bench.py --quick    # the smallest configuration, seconds (the test runs this)
    python bench.py --threads=2  # torch threads per process (default 1, see below)
    python bench.py --attack-responses  # (d) alone: attack peak memory against the number of clean responses
    python bench.py --sampling-chunks   # (f) alone: sampling peak memory against rollout_chunk
    python bench.py --estimate          # (e): per-GPU peak memory of the recipe on 8 x 80 GB (--gpus, --gpu_gb), its
                                        #      rollout chunk and predicted step time, from the configs
    python bench.py --attack-strength   # (g): band entropy gain and fresh rollouts' entropy against alpha (warm start)
    python bench.py --demo-speed=REV    # (h): the demo's step per phase here and at git revision REV, alternated
    python bench.py --gpu               # (i): two recipe steps of a random-weight Qwen2.5-VL-3B on one GPU (minutes)

Two random-weight models: `tiny` (model.load_policy("tiny"), vocabulary 103) and `tiny-152k`, the same small
Qwen2.5-VL with Qwen's real vocabulary of 151,936 tokens, where the LM head dominates.
(a) Step time at the same 12 responses per prompt: train.py runs a few steps per method in a fresh process,
    SaEI (n_clean 6, n_adv 6) and GRPO (n_clean 12, n_adv 0) alternately, `repeats` times; the per-step split
    (t_generate, t_attack, t_update) is read from metrics.jsonl, each run's first step (warm-up) is dropped and
    the median over the remaining steps is reported. The ratio is SaEI's median step over GRPO's.
(b) Peak memory of the attack (one PGD step: forward, backward to the image, and the objective on the attacked
    image), the memory-bounded objective train.py uses on large models (attack_objective="bounded") against the
    plain one the demo uses ("full_logits": the (n, L, V) logits of every response), one fresh process per
    configuration. Peak = the process's peak resident set (VmHWM, reset
    through /proc/self/clear_refs after a warm-up call) minus its resident set just before the call: everything
    the call allocates counts (autograd's saved tensors, temporaries, allocator slack); the model does not.
(c) Rollout tokens per second: valid response tokens sampled per second of t_generate, from the runs of (a).
(d) Attack peak memory as in (b) against the number of clean responses per prompt (same length each): ours runs
    each response's forward and backward alone, so its peak stays flat; the full-logits version grows with them.
(f) Peak memory of sampling 48 responses with the 152k vocabulary against rollout_chunk, the most responses one
    generate call takes (fresh process each, as in (b)): the per-step logits and the KV cache grow with it.
Every process runs single-threaded by default: on cores shared with other jobs, OpenMP threads that wait for
each other at every op make timings swing by 10x, while one thread per process stays steady. Ratios are what
this measures; absolute times are those of one core.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import datasets
import numpy as np
import torch
from PIL import Image

import data
import egas
import train
from data import build_prompt, n_image_tokens
import model as model_lib
from model import build_tiny, load_policy, sample, tiny_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
QWEN_VOCAB = 151936  # Qwen2.5-VL-3B's vocabulary (its published config.json)
PROBLEM = "<image>In the figure, find x. Round to the nearest tenth if necessary."
FULL = dict(steps=4, repeats=3, batch_size=2, response_len=64, image=224, mem_lengths=(256, 1024, 2048), mem_rows=1,
            mem_repeats=3, models=("tiny", "tiny-152k"), fresh_processes=True)
QUICK = dict(steps=2, repeats=1, batch_size=1, response_len=8, image=56, mem_lengths=(16,), mem_rows=1,
             mem_repeats=1, models=("tiny",), fresh_processes=False)


# ----------------------------------------------------------------------------- models and data

def build_model(vocab_size=None, seed=0):
    """The tiny Qwen2.5-VL in eval mode, optionally with a bigger vocabulary (model.build_tiny)."""
    policy, tok = build_tiny(seed, vocab_size=vocab_size)
    return policy.eval(), tok


def write_inputs(folder, models, n_records=8, size=224):
    """A local parquet dataset in the record schema (noise images, one fixed problem) and, for tiny-152k, a saved
    checkpoint train.py can load by path. Returns {model name: what to pass as --model}, the dataset path."""
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (size, size, 3), dtype=np.uint8))
              for i in range(n_records)]
    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    path = os.path.join(folder, "bench.parquet")
    datasets.Dataset.from_dict({"images": [[im] for im in images], "problem": [PROBLEM] * n_records,
                                "answer": ["12.5"] * n_records}, features=features).to_parquet(path)
    names = {}
    for name in models:
        if name == "tiny":
            names[name] = "tiny"
        else:
            policy, tok = build_model(QWEN_VOCAB)
            policy.save_pretrained(os.path.join(folder, name))
            tok.save_pretrained(os.path.join(folder, name))
            names[name] = os.path.join(folder, name)
    return names, path


# ----------------------------------------------------------------------------- (a) and (c): train.py steps

def _env(cfg):
    return dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))


def run_train(model, dataset, out_dir, n_clean, n_adv, cfg):
    """Run train.py (a fresh process, or in this one for --quick); returns its metrics, the first step dropped."""
    pixels = cfg["image"] ** 2
    args = ["--model", model, "--dataset", dataset, "--out_dir", out_dir, f"--n_clean={n_clean}", f"--n_adv={n_adv}",
            f"--max_steps={cfg['steps']}", f"--batch_size={cfg['batch_size']}",
            f"--max_response_len={cfg['response_len']}", f"--min_pixels={pixels}", f"--max_pixels={pixels}",
            "--eval_limit=0", "--eval_interval=0", "--save_interval=1000000", "--micro_batch_size=8",
            "--updates_per_rollout=1", "--attack_objective=full_logits",  # the CPU demo's attack
            "--gradient_checkpointing=False"]  # the CPU demo's update: micro-batches share their prompt's encoding
    if cfg["fresh_processes"]:
        run = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                             env=_env(cfg))
        if run.returncode != 0:
            raise SystemExit(f"train.py failed ({' '.join(args)}):\n{run.stderr[-2000:]}")
    else:
        train.main(args)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][1:]


def step_times(model, dataset, folder, cfg):
    """SaEI and GRPO runs, alternated so that load from other processes hits both alike -> per-method medians."""
    steps = {"saei": [], "grpo": []}
    for r in range(cfg["repeats"]):
        for method, (n_clean, n_adv) in (("saei", (6, 6)), ("grpo", (12, 0))):
            steps[method] += run_train(model, dataset, os.path.join(folder, f"{method}-{r}"), n_clean, n_adv, cfg)
    result = {}
    for method, records in steps.items():
        med = lambda key: statistics.median(r[key] for r in records)
        tokens = [r["response_len"] * 12 * cfg["batch_size"] / r["t_generate"] for r in records]
        result[method] = {"step": statistics.median(r["t_generate"] + r["t_attack"] + r["t_update"] for r in records),
                          "generate": med("t_generate"), "attack": med("t_attack"), "update": med("t_update"),
                          "tokens_per_s": statistics.median(tokens), "response_len": med("response_len")}
    return result


# ----------------------------------------------------------------------------- (b): attack memory

def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def attack_memory(method, length, rows, repeats, image):
    """One attack objective, forward and backward to the image -> {"peak_mb", "seconds" (median of repeats)}.

    Honest only in a fresh process (`--memory-worker`): in a long-lived one, memory the allocator kept from
    earlier work can be reused without raising the resident set.
    """
    torch.manual_seed(0)
    policy, tok = build_model(QWEN_VOCAB)
    x = torch.randint(0, 256, (3, image, image)).float() / 255
    prompt = torch.tensor(build_prompt(tok, PROBLEM, n_image_tokens(x)))
    chunk = train.DEFAULTS["logit_chunk"]

    def call(L):
        response = torch.randint(10, QWEN_VOCAB, (rows, L))  # any non-special ids: the cost does not depend on them
        seqs = torch.cat([prompt.expand(rows, -1), response], 1)
        attn, mask = torch.ones_like(seqs), torch.ones_like(response)
        ranking = torch.rand(rows, L)  # the entropies sampling recorded: any values rank the band alike
        clean = dict(prompt_ids=seqs[:, :len(prompt)], prompt_mask=attn[:, :len(prompt)], response_ids=response,
                     response_mask=mask, response_entropy=ranking)
        egas.attack(policy, [x], clean, rows, steps=1, alpha=2 / 255, chunk_size=chunk,
                    objective="bounded" if method == "ours" else "full_logits")

    call(8)  # warm-up: lazy initializations and thread pools are not the method's memory
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(length)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = _status_kb("VmHWM")
    return {"peak_mb": (peak - before) / 1024, "seconds": statistics.median(times)}


def attack_memory_fresh(method, length, cfg):
    """attack_memory in a fresh process, --quick too: in a process that has run other work, the allocator reuses
    freed memory and the peak can read 0."""
    args = (method, length, cfg["mem_rows"], cfg["mem_repeats"], cfg["image"])
    run = subprocess.run([sys.executable, __file__, "--memory-worker", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, env=_env(cfg))
    if run.returncode != 0:
        raise SystemExit(f"memory worker {method} L={length} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def attack_responses_table(threads=1, length=256, responses=(1, 2, 4, 6)):
    """(d): attack peak memory (MB) and time against the number of clean responses, ours and full logits."""
    cfg = dict(FULL, threads=threads, mem_repeats=1)
    lines = [f"| clean responses x {length} tokens, V={QWEN_VOCAB} | ours: peak MB | full logits: peak MB | ours: s |",
             "|---|---|---|---|"]
    for n in responses:
        ours, full = (attack_memory_fresh(m, length, dict(cfg, mem_rows=n)) for m in ("ours", "full"))
        lines.append(f"| {n} | {ours['peak_mb']:.0f} | {full['peak_mb']:.0f} | {ours['seconds']:.2f} |")
    print("\n".join(lines))
    return lines


def sampling_memory(rows, chunk, new_tokens=128, image=224):
    """Peak memory (MB) of sampling `rows` responses of `new_tokens` tokens in calls of at most `chunk` rows, with
    Qwen's 152k vocabulary (the per-step logits and the KV cache grow with the rows of a call). Fresh process only."""
    torch.manual_seed(0)
    policy, tok = build_model(QWEN_VOCAB)
    policy.eval()
    x = torch.randint(0, 256, (3, image, image)).float() / 255
    prompt = build_prompt(tok, PROBLEM, n_image_tokens(x))
    sample(policy, tok, [prompt], [x], 2, 4)  # warm-up
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    out = sample(policy, tok, [prompt] * (rows // 2), [x] * (rows // 2), 2, new_tokens, chunk_rows=chunk)
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024, "seconds": time.perf_counter() - start,
            "tokens": int(out["response_mask"].sum())}


def sampling_table(threads=1, rows=48, chunks=(48, 24, 12, 6)):
    """(f): sampling peak memory against rollout_chunk, each in a fresh process."""
    lines = [f"| rollout_chunk ({rows} responses, V={QWEN_VOCAB}) | peak MB | seconds | tokens sampled |",
             "|---|---|---|---|"]
    for chunk in chunks:
        run = subprocess.run([sys.executable, __file__, "--sampling-worker", str(rows), str(chunk)], cwd=ROOT,
                             capture_output=True, text=True, env=_env({"threads": threads}))
        if run.returncode != 0:
            raise SystemExit(f"sampling worker chunk={chunk} failed:\n{run.stderr[-2000:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        lines.append(f"| {chunk} | {r['peak_mb']:.0f} | {r['seconds']:.1f} | {r['tokens']} |")
    print("\n".join(lines))
    return lines


def attack_strength_table(alphas=(0, 2, 8, 32, 64), prompts=8, n=6, threads=2):
    """(g): what one PGD step of alpha/255 (T = 1, eps = alpha) does on the shipped warm start: the TsEC band's
    entropy gain, and the entropy of n fresh rollouts per prompt sampled on the attacked image (one seed)."""
    torch.set_num_threads(threads)
    policy, tok = load_policy(os.path.join(ROOT, "assets", "tiny-synthetic"))
    policy.eval()
    images, texts = zip(*[data.prepare(r, tok, 112 * 112, 112 * 112) for r in data.synthetic_split("train", n=prompts)])
    torch.manual_seed(0)
    clean = sample(policy, tok, texts, images, n, 96)

    def entropy(out):  # mean over responses of each response's mean token entropy
        mask = out["response_mask"].float()
        return ((out["response_entropy"] * mask).sum(1) / mask.sum(1)).mean().item()
    lines = [f"| alpha = eps, T = 1 (/255) | band entropy gain (nats, %) | fresh rollouts' entropy (clean {entropy(clean):.4f}) |",
             "|---|---|---|"]
    for alpha in alphas:
        attacked, stats = egas.attack(policy, list(images), clean, n, steps=1, alpha=alpha / 255)
        gains = [st["gain"] for st in stats]
        rel = [st["gain"] / st["objective_clean"] for st in stats]
        torch.manual_seed(1)  # the same seed for every alpha: alpha 0 is the control
        fresh = sample(policy, tok, texts, attacked, n, 96)
        lines.append(f"| {alpha} | {statistics.mean(gains):+.4f} ({100 * statistics.mean(rel):.1f}%) | {entropy(fresh):.4f} |")
    print("\n".join(lines))
    return lines


# ----------------------------------------------------------------------------- (e): per-GPU memory estimate

# Published config.json values (32B: the Qwen2.5-32B text model, 64 layers, 40 heads, 8 kv heads).
# Every size shares the vision tower: depth 32, hidden 1280, intermediate 3420, patch 14, 2x2 merge, 2 frames.
ARCHS = {
    "Qwen2.5-VL-3B": dict(vocab=151936, hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, tied=True,
                          v_depth=32, v_hidden=1280, v_intermediate=3420),
    "Qwen2.5-VL-7B": dict(vocab=152064, hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, tied=False,
                          v_depth=32, v_hidden=1280, v_intermediate=3420),
    "Qwen2.5-VL-32B": dict(vocab=152064, hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, tied=False,
                           v_depth=32, v_hidden=1280, v_intermediate=3420),
    # model.tiny_config and bench's tiny-152k, for the check against measured peaks
    "tiny": dict(vocab=103, hidden=128, intermediate=512, layers=4, heads=4, kv_heads=2, tied=False,
                 v_depth=2, v_hidden=64, v_intermediate=128),
}
ARCHS["tiny-152k"] = dict(ARCHS["tiny"], vocab=QWEN_VOCAB)
GB = 1024 ** 3


def parameters(a):
    """(all parameters, the language model's): the vision tower is frozen in the recipe, so it has no Adam state."""
    H, I, kvd = a["hidden"], a["intermediate"], a["hidden"] // a["heads"] * a["kv_heads"]
    layer = 2 * H * H + H + 2 * (H * kvd + kvd) + 3 * H * I + 2 * H  # q (bias), o; k, v (bias); MLP; two norms
    text = a["layers"] * layer + a["vocab"] * H * (1 if a["tied"] else 2) + H
    vh, vi, merged = a["v_hidden"], a["v_intermediate"], 4 * a["v_hidden"]
    block = vh * 3 * vh + 3 * vh + vh * vh + vh + 3 * (vh * vi) + 2 * vi + vh + 2 * vh
    vision = a["v_depth"] * block + 1176 * vh + vh + merged * merged + merged + merged * H + H
    return text + vision, text


def activation_bytes(hidden, intermediate, kv_dim, compute_bytes, autocast=False):
    """Bytes autograd keeps per token per decoder layer without checkpointing: in compute precision the normed
    inputs, q, k, v (and their rotated copies), the attention output, and the MLP's gate, up, activation and product;
    the two RMS norms keep their fp32 input. Matches what was measured in bf16: 133 KiB (3B), 231 KiB (7B). Under
    autocast (fp32 weights, the one-GPU path) some of them stay fp32: measured 11 bytes per hidden unit more
    (155.6 KiB at 3B, 269.6 KiB at 7B widths, CPU autocast)."""
    return compute_bytes * (7 * hidden + 3 * kv_dim + 4 * intermediate) + 8 * hidden + (11 * hidden if autocast else 0)


def attack_bytes(a, prompt_len, response_len, patches, chunk, compute_bytes=2, autocast=False):
    """The attack's own memory, above the weights: the prompt's and the image's graphs (kept while the responses
    run), one response's graph, and the LM head's chunk of fp32 logits and their gradient."""
    kvd = a["hidden"] // a["heads"] * a["kv_heads"]
    text = activation_bytes(a["hidden"], a["intermediate"], kvd, compute_bytes, autocast) * a["layers"]
    vision = activation_bytes(a["v_hidden"], a["v_intermediate"], a["v_hidden"], compute_bytes) * a["v_depth"]
    return (prompt_len + response_len) * text + patches * vision + 2 * min(chunk, response_len) * a["vocab"] * 4


# A Geometry3K prompt: its (small) figure upscaled to min_pixels = 262,144 px is 334 image tokens after the 2x2
# merge, plus about 120 tokens of chat template, problem and format instruction (an assumption, not a count).
GEO3K_PROMPT_LEN = 454
# For the predicted step time: one H100 SXM's dense bf16 peak and HBM bandwidth, at the utilisations a plain
# PyTorch loop (no fused kernels, no vLLM) can be expected to reach; and what a decode step costs at least, the
# Python and kernel launches of one forward, measured here by `decode_floor` (a GPU host's CPU is faster: upper end).
H100_FLOPS, H100_BYTES_PER_S, MFU, MBU = 989e12, 3.35e12, 0.35, 0.6
MEAN_RESPONSE = 400          # response tokens on average (the longest of each call runs to max_response_len)
EASYR1_7B_STEP = 180.0       # EasyR1's published Geometry3K step: 7B, 8 x H100, 512 prompts x 5 responses, vLLM


def estimate(name, gpus, cfg=None, gpu_gb=80, prompt_len=GEO3K_PROMPT_LEN, floor_s=None):
    """Per-GPU peak memory in GiB by phase for train.py's recipe (cfg: train.DEFAULTS) on `gpus` GPUs of `gpu_gb`
    GB, the rollout chunk it leads to, and the step time per phase it predicts. gpus=1 is the path without torchrun:
    fp32 weights under bf16 autocast (fp32 keys in the KV cache, some fp32 activations); gpus>1 is FSDP2 with bf16
    compute weights. floor_s: a decode step's fixed cost in seconds (decode_floor), None: not predicted."""
    cfg = cfg or train.DEFAULTS
    a = ARCHS[name]
    H, I, V, layers = a["hidden"], a["intermediate"], a["vocab"], a["layers"]
    kvd = H // a["heads"] * a["kv_heads"]
    autocast = gpus == 1
    total, trainable = parameters(a)
    shards = (4 * total + 12 * trainable) / gpus  # fp32 weights; fp32 gradients and Adam's two moments
    adam_transient = 4 * trainable / gpus  # CUDA AdamW's foreach step copies a moment of the whole shard at once
    # FSDP2 holds every layer gathered in bf16 during generation and the attack (model.gather_weights); autocast
    # keeps the bf16 casts of every weight for the whole `with` block: the same 2 bytes per parameter
    gathered = 2 * total
    P, L, n = prompt_len, cfg["max_response_len"], max(cfg["n_clean"], cfg["n_adv"])
    patches = cfg["max_pixels"] // data.PATCH ** 2  # the image's patches before the 2x2 merge, at most
    # generation: model.sample's chunk, the whole prompts whose decode_bytes fit its share of what is left
    key_bytes = 4 if autocast else 2
    per_prompt = model_lib.decode_bytes(a, P, L, n, patches, key_bytes, 2)
    prompts = cfg["batch_size"] // gpus
    fits = max(1, int(model_lib.SAMPLING_MEMORY * (gpu_gb * 1e9 - shards - gathered) // per_prompt))
    per_call = min(prompts, cfg["rollout_chunk"] // n if cfg["rollout_chunk"] else fits)
    calls = -(-prompts // per_call) * (2 if cfg["n_adv"] else 1)  # each half samples on its own images
    generation = shards + gathered + per_call * per_prompt
    attack = shards + gathered + attack_bytes(a, P, L, patches, cfg["logit_chunk"], autocast=autocast)
    # update: gradient checkpointing keeps each layer's input; one layer is recomputed at a time; layers are
    # gathered one (and the next, prefetched) at a time, the root (embeddings, LM head) for the whole pass
    m = cfg["micro_batch_size"] * (P + L)
    root = 2 * V * H * (1 if a["tied"] else 2)
    update = (shards + adam_transient + m * H * 2 * layers + m * activation_bytes(H, I, kvd, 2, autocast)
              + 2 * cfg["logit_chunk"] * V * 4 + root + 2 * 2 * (total - root) / layers)
    out = {"params_b": total / 1e9, "shards": shards / GB, "generation": generation / GB, "attack": attack / GB,
           "update": update / GB, "rows_per_call": per_call * n, "calls": calls}
    if floor_s is not None:  # step time, per GPU (every GPU does its share at once)
        rows = out["rows_per_call"]
        kv_read = rows * (P + L / 2) * layers * kvd * (key_bytes + 2)  # the cache, half full on average
        token_s = max(floor_s, (2 * total + kv_read)  # every weight and the cache read once a token
                       / (H100_BYTES_PER_S * MBU), 2 * trainable * rows / (H100_FLOPS * MFU))
        prefill_s = 2 * trainable * per_call * P / (H100_FLOPS * MFU)
        responses = prompts * (cfg["n_clean"] + cfg["n_adv"])
        tokens = responses * (P + MEAN_RESPONSE)  # the update re-reads each prompt with each micro-batch
        passes = 2 + 8 * cfg["ppo_epochs"] + (2 if cfg["kl_coef"] else 0)  # pi_old; fwd + recompute + bwd; ref
        attack_tokens = prompts * (P + cfg["n_clean"] * MEAN_RESPONSE) if cfg["n_adv"] and cfg["perturb"] == "egas" else 0
        out.update(t_generate=calls * (L * token_s + prefill_s),
                   t_attack=4 * trainable * attack_tokens * cfg["pgd_steps"] / (H100_FLOPS * MFU),  # fwd + bwd to input
                   t_update=passes * trainable * tokens / (H100_FLOPS * MFU))
    return out


def decode_floor(layers, new_tokens=64, repeats=3):
    """Seconds per decode step that do not depend on the model's width: `model.decode` of one response on a model
    `layers` deep and 64 wide, where the arithmetic is nothing and what is left is Python and op dispatch."""
    policy, tok = model_lib.build_tiny(text_layers=layers, text_hidden=64, vision_depth=1, vision_hidden=32)
    policy.eval()
    x = torch.rand(3, 56, 56)
    ids, mask = model_lib.left_pad([build_prompt(tok, PROBLEM, n_image_tokens(x))], tok.pad_token_id)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model_lib.decode(policy, tok, ids, mask, [x], 1, new_tokens, greedy=True)
        times.append((time.perf_counter() - t) / new_tokens)
    return statistics.median(times)


def estimate_table(gpus=8, gpu_gb=80, floors=None):
    """The memory table and the predicted step; floors: {layers: seconds} per decode step (measured if None)."""
    floors = floors or {depth: decode_floor(depth) for depth in {ARCHS[m]["layers"] for m in ("Qwen2.5-VL-3B", "Qwen2.5-VL-7B")}}
    lines = [f"Per-GPU peak memory by phase at Geometry3K-length prompts ({GEO3K_PROMPT_LEN} tokens)", "",
             f"| model ({gpus} GPUs x {gpu_gb} GB) | parameters | weights + Adam shards | generation | attack | update "
             f"| peak at {train.DEFAULTS['max_prompt_len']}-token prompts | fits | responses per sampling call | "
             "sampling calls per step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("Qwen2.5-VL-3B", "Qwen2.5-VL-7B", "Qwen2.5-VL-32B"):
        e = estimate(name, gpus, gpu_gb=gpu_gb)
        worst = estimate(name, gpus, gpu_gb=gpu_gb, prompt_len=train.DEFAULTS["max_prompt_len"])
        peak = max(worst["generation"], worst["attack"], worst["update"])
        lines.append(f"| {name} | {e['params_b']:.2f} B | {e['shards']:.1f} GiB | {e['generation']:.1f} GiB | "
                     f"{e['attack']:.1f} GiB | {e['update']:.1f} GiB | {peak:.1f} GiB | "
                     f"{'yes' if peak <= gpu_gb * 1e9 / GB else 'NO'} | {e['rows_per_call']} | {e['calls']} |")
    cfg = train.DEFAULTS
    responses = cfg["n_clean"] + cfg["n_adv"]
    lines += ["", f"Predicted step on H100s ({gpus} GPUs, {cfg['batch_size']} prompts x {responses} responses, "
              f"{MEAN_RESPONSE} tokens on average, each sampling call running to {cfg['max_response_len']}; "
              f"decode floor measured here: " + ", ".join(f"{1e3 * s:.1f} ms at {d} layers" for d, s in sorted(floors.items())) + ")",
              "| model | generation | attack | update | step | EasyR1 (vLLM), scaled to these responses |", "|---|---|---|---|---|---|"]
    for name in ("Qwen2.5-VL-3B", "Qwen2.5-VL-7B"):
        e = estimate(name, gpus, gpu_gb=gpu_gb, floor_s=floors[ARCHS[name]["layers"]])
        if max(e["generation"], e["attack"], e["update"]) > gpu_gb * 1e9 / GB:
            lines.append(f"| {name} | does not fit | | | | |")
            continue
        step = e["t_generate"] + e["t_attack"] + e["t_update"]
        # EasyR1's 180 s (7B, 8 GPUs, 512 x 5) scaled by responses per GPU; its 3B would be faster still
        easyr1 = EASYR1_7B_STEP * (cfg["batch_size"] * responses / gpus) / (512 * 5 / 8) if name.endswith("7B") else None
        lines.append(f"| {name} | {e['t_generate']:.0f} s | {e['t_attack']:.0f} s | {e['t_update']:.0f} s | {step:.0f} s | "
                     f"{'-' if easyr1 is None else f'{easyr1:.0f} s'} |")
    print("\n".join(lines))
    return lines


def estimate_check(lengths=(256, 1024, 2048), image=224):
    """The attack estimate against the measured peak (bench (b), fresh processes) of the CPU models in fp32."""
    prompt_len = len(build_prompt(tiny_tokenizer(), PROBLEM, n_image_tokens(torch.zeros(3, image, image))))
    lines = ["| model, fp32 on CPU | response tokens | estimated attack MB | measured MB |", "|---|---|---|---|"]
    for L in lengths:
        est = attack_bytes(ARCHS["tiny-152k"], prompt_len, L, image * image // 196, 1024, compute_bytes=4) / 2 ** 20
        measured = attack_memory_fresh("ours", L, dict(FULL, threads=1, mem_rows=1, mem_repeats=1, image=image))
        lines.append(f"| tiny-152k | {L} | {est:.0f} | {measured['peak_mb']:.0f} |")
    print("\n".join(lines))
    return lines


# ----------------------------------------------------------------------------- the table

def main(quick=False, threads=1):
    cfg = dict(QUICK if quick else FULL, threads=threads)
    rows = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # for what runs in this process (--quick); restored at the end
    with tempfile.TemporaryDirectory() as folder:
        names, dataset = write_inputs(folder, cfg["models"], size=cfg["image"])
        for name in cfg["models"]:
            t = step_times(names[name], dataset, os.path.join(folder, name), cfg)
            s, g = t["saei"], t["grpo"]
            ratio = s["step"] / g["step"]
            split = lambda m: f"{m['step']:.2f} = {m['generate']:.2f} + {m['attack']:.2f} + {m['update']:.2f}"
            rows.append((name, f"step time (s) = generate + attack + update, {cfg['batch_size']} prompts x 12 "
                               f"responses x <= {cfg['response_len']} tokens", split(s), split(g), f"{ratio:.2f}",
                         f"<= 1.3: {'yes' if ratio <= 1.3 else 'NO'}"))
            rows.append((name, f"rollout tokens/s (mean response {s['response_len']:.0f} / {g['response_len']:.0f} "
                               "tokens)", f"{s['tokens_per_s']:.0f}", f"{g['tokens_per_s']:.0f}",
                         f"{s['tokens_per_s'] / g['tokens_per_s']:.2f}", ""))
    mem = {(m, L): attack_memory_fresh(m, L, cfg) for L in cfg["mem_lengths"] for m in ("ours", "full")}
    vocab = f"V={QWEN_VOCAB}"
    for L in cfg["mem_lengths"]:
        ours, full = mem["ours", L]["peak_mb"], mem["full", L]["peak_mb"]
        last = L == cfg["mem_lengths"][-1]
        rows.append(("tiny-152k", f"attack peak memory (MB), {cfg['mem_rows']} response x {L} tokens, {vocab}",
                     f"{ours:.0f}", f"{full:.0f}", f"{ours / full:.2f}",
                     f"<= 0.25: {'yes' if ours / full <= 0.25 else 'NO'}" if last else ""))
    for L in cfg["mem_lengths"]:
        ours, full = mem["ours", L]["seconds"], mem["full", L]["seconds"]
        rows.append(("tiny-152k", f"attack time (s), {cfg['mem_rows']} response x {L} tokens", f"{ours:.2f}",
                     f"{full:.2f}", f"{ours / full:.2f}", ""))
    if len(cfg["mem_lengths"]) > 1:
        lo, hi = cfg["mem_lengths"][0], cfg["mem_lengths"][-1]
        growth = mem["ours", hi]["peak_mb"] / mem["ours", lo]["peak_mb"]
        rows.append(("tiny-152k", f"attack peak memory growth, {lo} -> {hi} tokens (x{hi // lo} length)",
                     f"x{growth:.1f}", f"x{mem['full', hi]['peak_mb'] / mem['full', lo]['peak_mb']:.1f}", "",
                     f"<= x{hi // lo} (linear): {'yes' if growth <= hi / lo else 'NO'}"))
    header = ("model", "measurement", "SaEI / ours", "GRPO / full logits", "ratio", "target")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print(f"torch {torch.__version__}, {threads} thread(s) per process, {os.cpu_count()} CPUs")
    print("\n".join(lines))
    torch.set_num_threads(threads_before)
    return rows


# ----------------------------------------------------------------------------- (h): the demo's step, before and after

def demo_speed(against, steps=8, repeats=3, threads=2):
    """(h): the offline demo's step time here and at git revision `against` (a worktree in a temp folder), measured
    alternately in fresh processes (old, new, old, new, ...): per phase, the median over every run's steps but
    its first (warm-up). Each tree runs its own config/demo.py, the evaluations off. Also this tree's SaEI/GRPO
    step ratio (GRPO: 12 clean responses). Returns the table's lines."""
    folder = tempfile.mkdtemp()
    old_tree = os.path.join(folder, "old")
    subprocess.run(["git", "worktree", "add", "--detach", old_tree, against], cwd=ROOT, check=True,
                   capture_output=True)
    phases = ("t_generate", "t_attack", "t_update")
    runs = {"before": [], "after": [], "grpo": []}
    try:
        for r in range(repeats):
            for name, tree, extra in (("before", old_tree, []), ("after", ROOT, []),
                                      ("grpo", ROOT, ["--n_clean=12", "--n_adv=0"])):
                out = os.path.join(folder, f"{name}{r}")
                args = [sys.executable, "train.py", f"--max_steps={steps}", "--eval_limit=0", "--eval_interval=0",
                        f"--out_dir={out}", f"--save_interval={steps + 1}", *extra]
                run = subprocess.run(args, cwd=tree, capture_output=True, text=True, env=_env({"threads": threads}))
                if run.returncode != 0:
                    raise SystemExit(f"train.py failed in {tree}:\n{run.stderr[-2000:]}")
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    runs[name] += [json.loads(line) for line in f][1:]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", old_tree], cwd=ROOT, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
    median = lambda name, key: statistics.median(m[key] for m in runs[name])
    step = lambda name: statistics.median(sum(m[k] for k in phases) for m in runs[name])
    lines = [f"demo step, {steps - 1} steps x {repeats} runs per tree, alternated, {threads} threads, medians (s)",
             f"| phase | before ({against}) | after | after / before |", "|---|---|---|---|"]
    for key in phases:
        lines.append(f"| {key} | {median('before', key):.3f} | {median('after', key):.3f} | "
                     f"{median('after', key) / median('before', key):.2f} |")
    lines.append(f"| step | {step('before'):.3f} | {step('after'):.3f} | {step('after') / step('before'):.2f} |")
    lines.append(f"SaEI / GRPO step (after): {step('after'):.3f} / {step('grpo'):.3f} = {step('after') / step('grpo'):.2f}")
    print("\n".join(lines))
    return lines


def arch_model(name, device, dtype):
    """ARCHS[name] as a random-weight Qwen2.5-VL (the published sizes; the tiny tokenizer's ids, which every
    vocabulary here holds) on `device` -> (model, tokenizer). Nothing is downloaded."""
    a, tok = ARCHS[name], tiny_tokenizer()
    config = model_lib.tiny_config(tok, a["layers"], a["hidden"], a["v_depth"], a["v_hidden"])
    half = a["hidden"] // a["heads"] // 2  # each head's rotary half, split into (time, height, width) sections
    for key, value in dict(vocab_size=a["vocab"], intermediate_size=a["intermediate"], num_attention_heads=a["heads"],
                           num_key_value_heads=a["kv_heads"], tie_word_embeddings=a["tied"],
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                            "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}).items():
        setattr(config.text_config, key, value)
    if a["v_depth"] == 32:  # Qwen2.5-VL's vision tower: 16 heads, full attention every 8th block
        config.vision_config.num_heads, config.vision_config.fullatt_block_indexes = 16, [7, 15, 23, 31]
    config.vision_config.intermediate_size, config.tie_word_embeddings = a["v_intermediate"], a["tied"]
    with torch.device(device):
        model = model_lib.use_patch_projection(model_lib.Qwen2_5_VLForConditionalGeneration(config)).to(dtype)
    model.generation_config = model_lib.GenerationConfig()
    return model, tok


def gpu_check(name="Qwen2.5-VL-3B", device="cuda", prompts=4, response_len=256, steps=2, overrides=None):
    """(i) `python bench.py --gpu`: the recipe's step on one GPU with a random-weight `name`, nothing downloaded.
    The model is saved and train.py runs `steps` SaEI steps on it from the folder (the recipe's constants:
    n_clean 6 + n_adv 6, bounded attack, checkpointed update, bf16 autocast), on `prompts` synthetic problems per
    step at the recipe's image size; random weights rarely stop, so responses run to `response_len`. Prints per
    phase the measured peak CUDA memory beside `--estimate`'s at the same settings (at
    Geometry3K-length prompts), the step time, rollout tokens per second, and the attack's gain (the TsEC
    objective's rise) in bf16 autocast against fp32 on the same prompt and responses. On CPU the test suite runs
    it with name="tiny" (overrides: other train.py constants, e.g. a smaller image). Returns the table's lines."""
    overrides = overrides or {}
    folder = tempfile.mkdtemp()
    try:
        model, tok = arch_model(name, device, torch.bfloat16)
        model.save_pretrained(os.path.join(folder, "model"))
        tok.save_pretrained(os.path.join(folder, "model"))
        del model
        out = os.path.join(folder, "run")
        args = [f"--model={os.path.join(folder, 'model')}", "--dataset=synthetic", f"--batch_size={prompts}",
                f"--max_steps={steps}", "--eval_interval=0", "--eval_limit=0", f"--save_interval={steps + 1}",
                f"--max_response_len={response_len}", f"--device={device}", f"--out_dir={out}",
                *[f"--{key}={value}" for key, value in overrides.items()]]
        train.main(args)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            logs = [json.loads(line) for line in f]
        cfg = dict(train.DEFAULTS, batch_size=prompts, max_response_len=response_len, **overrides)
        estimated = estimate(name, 1, cfg)
        last = logs[-1]
        rows = prompts * (cfg["n_clean"] + cfg["n_adv"])
        lines = [f"{name}, random weights, {device}: {steps} SaEI steps of {prompts} prompts x ({cfg['n_clean']} + "
                 f"{cfg['n_adv']}) responses "
                 f"(responses up to {response_len} tokens), the last step's numbers",
                 "| phase | seconds | peak memory (GiB) | estimate (GiB) |", "|---|---|---|---|"]
        for phase in ("generate", "attack", "update"):
            measured = last.get(f"mem_{phase}")
            lines.append(f"| {phase} | {last[f't_{phase}']:.1f} | {'-' if measured is None else f'{measured:.1f}'} | "
                         f"{estimated['generation' if phase == 'generate' else phase]:.3g} |")
        step = sum(last[f"t_{p}"] for p in ("generate", "attack", "update"))
        lines.append(f"step {step:.1f} s; rollout {rows * last['response_len'] / last['t_generate']:.0f} tokens/s "
                     f"({rows} responses, {last['response_len']:.0f} tokens on average)")
        lines.append(attack_precision(os.path.join(folder, "model"), device, cfg))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(lines))
    return lines


def attack_precision(folder, device, cfg):
    """The attack's gain on one synthetic prompt and its n_clean responses, in bf16 autocast and in fp32 (the same
    responses, sampled in fp32) -> one line."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # what train.main held
    policy, tok = load_policy(folder, device=device)
    policy.eval()
    record = data.load_records("synthetic", "train")[0]
    image, prompt = data.prepare(record, tok, min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    image = image.to(device)
    torch.manual_seed(0)
    clean = sample(policy, tok, [prompt], [image], cfg["n_clean"], max_new_tokens=cfg["max_response_len"])
    gains = {}
    for precision, enabled in (("bf16", True), ("fp32", False)):
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=enabled):
            _, stats = egas.attack(policy, [image], clean, cfg["n_clean"], steps=cfg["pgd_steps"],
                                   alpha=cfg["pgd_alpha"], band=cfg["tsec_band"], rows_per_pass=cfg["attack_rows"],
                                   chunk_size=cfg["logit_chunk"])
        gains[precision] = stats[0]["gain"]
    return (f"attack gain on one prompt (alpha {cfg['pgd_alpha'] * 255:.0f}/255): bf16 {gains['bf16']:+.4g}, "
            f"fp32 {gains['fp32']:+.4g} nats")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-worker"]:
        method, length, rows, repeats, image = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(attack_memory(method, length, rows, repeats, image)))
    elif sys.argv[1:2] == ["--sampling-worker"]:
        print(json.dumps(sampling_memory(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        threads = [int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--threads=")]
        gpus = [int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--gpus=")]
        gpu_gb = [int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--gpu_gb=")]
        if "--gpu" in sys.argv[1:]:
            gpu_check()
        elif "--estimate" in sys.argv[1:]:
            estimate_table(gpus[0] if gpus else 8, gpu_gb[0] if gpu_gb else 80)
            if "--check" in sys.argv[1:]:
                estimate_check()
        elif "--attack-responses" in sys.argv[1:]:
            attack_responses_table(threads[0] if threads else 1)
        elif "--sampling-chunks" in sys.argv[1:]:
            sampling_table(threads[0] if threads else 1)
        elif any(a.startswith("--demo-speed") for a in sys.argv[1:]):  # --demo-speed=REV: before (REV) and after
            rev = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--demo-speed="))
            demo_speed(rev, threads=threads[0] if threads else 2)
        elif "--attack-strength" in sys.argv[1:]:
            attack_strength_table(threads=threads[0] if threads else 2)
        else:
            main(quick="--quick" in sys.argv[1:], threads=threads[0] if threads else 1)

"""The test suite: CPU, offline, a few minutes. Organised by the file it tests, in the order of README's file map.

Every test asserts a number or a behaviour that would be wrong if the code were wrong. The model is the real
Qwen2_5_VLForConditionalGeneration class at a tiny size; the real Geometry3K diagrams come from
assets/geometry3k-sample (six problems, InterGPS, MIT).
"""
import csv
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import types

from PIL import Image
from datasets import load_dataset
import datasets
import pytest
import torch

from rewards import ACCURACY_WEIGHT, FORMAT_WEIGHT, extract_answer, format_ok, is_correct, score
import bench
import checkpoint
import configurator
import data
import distributed
import egas
import eval as evaluation
import grpo
import model as model_lib
import ppo
import rewards
import train
import tsec
import vepo

ROOT = os.path.dirname(os.path.abspath(__file__))
GEO3K_SAMPLE = os.path.join(ROOT, "assets", "geometry3k-sample", "test.parquet")
# a small SaEI run: the tiny model, 2 prompts x (2 clean + 2 adversarial) responses of at most 24 tokens
SMALL = ["--model", "tiny", "--dataset", GEO3K_SAMPLE, "--min_pixels", "3136", "--max_pixels", "12544",
         "--max_response_len", "24", "--batch_size", "2", "--n_clean", "2", "--n_adv", "2", "--eval_limit", "2",
         "--updates_per_rollout", "1"]
SMALL_ONE_STEP = SMALL + ["--max_steps", "1"]
# the same on the shipped warm start and the synthetic task: rewards differ within a group, so advantages are not 0
WARM = ["--model", "assets/tiny-synthetic", "--dataset", "synthetic", "--min_pixels", "12544", "--max_pixels", "12544",
        "--max_response_len", "48"]


# ----------------------------------------------------------------------------- shared fixtures and helpers

@pytest.fixture(scope="module")
def geo3k():
    import datasets
    return datasets.load_dataset("parquet", data_files=GEO3K_SAMPLE, split="train")


@pytest.fixture(scope="module")
def tiny():
    policy, tok = model_lib.load_policy("tiny", seed=0)
    return policy.eval(), tok


def _clean_rollouts(policy, tok, images, n, max_new_tokens=40, seed=0):
    prompts = [data.build_prompt(tok, "<image>How many sides?", data.n_image_tokens(x)) for x in images]
    torch.manual_seed(seed)
    return model_lib.sample(policy, tok, prompts, images, n, max_new_tokens)


V, IMAGE, STRINGS = datasets.Value, datasets.Image(), datasets.List(datasets.Value("string"))


def _image(color, size=(60, 40)):
    return Image.new("RGB", size, color)


def _table(rows, features):
    """Rows (dicts) -> a datasets.Dataset with the given features; images are stored as datasets stores them."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=datasets.Features(features))


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the arrow files `datasets` builds from the local copies out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Local copies of MMK12, MathVista, MathVerse, MathVision, HallusionBench and We-Math in their hub schemas and in the
    layouts they come in (save_to_disk folders, hub-style parquet folders). Returns name -> path."""
    root = tmp_path_factory.mktemp("hub")
    paths = {}

    # xyliu6/k12-freeform: images, problem, answer; splits train / test -> a save_to_disk DatasetDict
    k12 = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string")}
    datasets.DatasetDict({
        "train": _table([{"images": [_image("red")], "problem": "<image>How many apples? ", "answer": "3"},
                         {"images": [_image("blue")], "problem": "Solve for x: 2x = 1.", "answer": "\\frac{1}{2}"},
                         {"images": [_image("green")], "problem": "<image>Area?", "answer": "12"}], k12),
        "test": _table([{"images": [_image("red")], "problem": "<image>Find the slope.", "answer": "-2"},
                        {"images": [_image("blue")], "problem": "<image>Speed in m/s?", "answer": "2.5"}], k12),
    }).save_to_disk(str(root / "mmk12"))
    paths["mmk12"] = root / "mmk12"

    # AI4Math/MathVista testmini -> data/testmini-00000-of-00001.parquet, as on the hub
    meta = {"category": V("string"), "context": V("string"), "grade": V("string"), "img_height": V("int64"),
            "img_width": V("int64"), "language": V("string"), "skills": STRINGS, "source": V("string"),
            "split": V("string"), "task": V("string")}
    vista = {"pid": V("string"), "question": V("string"), "image": V("string"), "decoded_image": IMAGE,
             "choices": STRINGS, "unit": V("string"), "precision": V("float64"), "answer": V("string"),
             "question_type": V("string"), "answer_type": V("string"), "metadata": meta, "query": V("string")}
    m = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school", "img_height": 40,
         "img_width": 60, "language": "english", "skills": ["geometry reasoning"], "source": "Geometry3K",
         "split": "testmini", "task": "geometry problem solving"}
    _table([{"pid": "1", "question": "What is the measure of angle B?", "image": "images/1.jpg",
             "decoded_image": _image("red"), "choices": ["30°", "45°", "60°", "90°"], "unit": None,
             "precision": None, "answer": "45°", "question_type": "multi_choice", "answer_type": "text",
             "metadata": m, "query": "Hint: Please answer the question and provide the correct option letter, e.g., "
                                     "A, B, C, D, at the end.\nQuestion: What is the measure of angle B?\nChoices:\n"
                                     "(A) 30°\n(B) 45°\n(C) 60°\n(D) 90°"},
            {"pid": "2", "question": "What is the value of the bar labeled x?", "image": "images/2.jpg",
             "decoded_image": _image("blue"), "choices": None, "unit": None, "precision": 1.0, "answer": "1.5",
             "question_type": "free_form", "answer_type": "float", "metadata": m,
             "query": "Hint: Please answer the question requiring a floating-point number with one decimal place and "
                      "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is the value of the "
                      "bar labeled x?"}],
           vista).to_parquet(str(root / "mathvista" / "data" / "testmini-00000-of-00001.parquet"))
    paths["mathvista"] = root / "mathvista"

    # AI4Math/MathVerse, config testmini -> testmini.parquet at the repository's root, as on the hub
    verse = {"sample_index": V("string"), "problem_index": V("string"), "problem_version": V("string"),
             "question": V("string"), "image": IMAGE, "answer": V("string"), "question_type": V("string"),
             "metadata": {"split": V("string"), "source": V("string"), "subject": V("string"),
                          "subfield": V("string")},
             "query_wo": V("string"), "query_cot": V("string"), "question_for_eval": V("string")}
    vm = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}
    mc = ("As shown in the figure, AB is parallel to CD and angle 1 = 40.0, then angle 2 is ()\n"
          "Choices:\nA:40°\nB:50°\nC:130°\nD:140°")
    _table([{"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant", "question": mc,
             "image": _image("red"), "answer": "D", "question_type": "multi-choice", "metadata": vm,
             "query_wo": "...", "query_cot": "Please first conduct reasoning, and then answer the question and "
                                             "provide the correct option letter at the end.\nQuestion: " + mc,
             "question_for_eval": mc},
            {"sample_index": "2", "problem_index": "2", "problem_version": "Text Lite",
             "question": "Find the length of AC.", "image": _image("blue"), "answer": "10",
             "question_type": "free-form", "metadata": vm, "query_wo": "...", "query_cot": "...",
             "question_for_eval": "Find the length of AC."},
            {"sample_index": "3", "problem_index": "1", "problem_version": "Vision Only", "question": "",
             "image": _image("green"), "answer": "D", "question_type": "multi-choice", "metadata": vm,
             "query_wo": "...", "query_cot": "...", "question_for_eval": mc}],
           verse).to_parquet(str(root / "mathverse" / "testmini.parquet"))
    paths["mathverse"] = root / "mathverse"

    # MathLLMs/MathVision test (and testmini) -> a save_to_disk DatasetDict
    vision = {"id": V("string"), "question": V("string"), "options": STRINGS, "image": V("string"),
              "decoded_image": IMAGE, "answer": V("string"), "solution": V("string"), "level": V("int64"),
              "subject": V("string")}
    rows = [{"id": "1", "question": "Which of the cubes can be folded from <image1>?",
             "options": ["1", "2", "3", "4", "5"], "image": "images/1.jpg", "decoded_image": _image("red"),
             "answer": "C", "solution": None, "level": 2, "subject": "solid geometry"},
            {"id": "2", "question": "How many triangles are there in the picture?", "options": [],
             "image": "images/2.jpg", "decoded_image": _image("blue"), "answer": "7", "solution": None, "level": 1,
             "subject": "counting"}]
    datasets.DatasetDict({"test": _table(rows, vision), "testmini": _table(rows[:1], vision)}).save_to_disk(
        str(root / "mathvision"))
    paths["mathvision"] = root / "mathvision"

    # lmms-lab/HallusionBench -> data/image-*.parquet and data/non_image-*.parquet, as on the hub
    hallu = {k: V("string") for k in ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note",
                                      "question_id", "question", "gt_answer_details", "gt_answer", "filename")}
    hallu["image"] = IMAGE

    def hallu_row(i, question, gt, image):
        return {"category": "VD", "subcategory": "illusion", "visual_input": "1" if image else "0", "set_id": "0",
                "figure_id": str(i), "sample_note": "circle", "question_id": str(i), "question": question,
                "gt_answer_details": "", "gt_answer": gt, "filename": f"VD/illusion/0_{i}.png", "image": image}
    _table([hallu_row(0, "Is the left orange circle the same size as the right one?", "1", _image("orange")),
            hallu_row(1, "Is the left orange circle larger than the right one?", "0", _image("orange")),
            hallu_row(2, "Is the line on top longer?", "0", _image("gray"))],
           hallu).to_parquet(str(root / "hallusionbench" / "data" / "image-00000-of-00001.parquet"))
    _table([hallu_row(3, "Is Paris the capital of France?", "1", None)],
           hallu).to_parquet(str(root / "hallusionbench" / "data" / "non_image-00000-of-00001.parquet"))
    paths["hallusionbench"] = root / "hallusionbench"

    # We-Math/We-Math testmini -> testmini.parquet at the repository's root, as on the hub
    wemath = {"ID": V("string"), "split": V("string"), "knowledge concept": V("string"), "question": V("string"),
              "option": V("string"), "answer": V("string"), "key": V("string"), "question number": V("int64"),
              "knowledge concept description": V("string"), "image_path": IMAGE}
    _table([{"ID": "1steps_1", "split": "testmini", "knowledge concept": "Area of Triangles",
             "question": "As shown in the figure, what is the area of the triangle?",
             "option": "A. 6cm²; B. 8cm²; C. 10cm²; D. 12cm²; E. No correct answer", "answer": "D", "key": "1",
             "question number": 1, "knowledge concept description": "...", "image_path": _image("red")},
            {"ID": "2steps_3", "split": "testmini", "knowledge concept": "Circumference of Circles",
             "question": "The circle's radius is 2 cm. What is its circumference?",
             "option": "A. 4π cm; B. 2π cm; C. 8π cm", "answer": "A", "key": "2-1", "question number": 3,
             "knowledge concept description": "...", "image_path": _image("blue")}],
           wemath).to_parquet(str(root / "wemath" / "testmini.parquet"))
    paths["wemath"] = root / "wemath"
    return {k: str(v) for k, v in paths.items()}


def _check_shape(records):
    for i in range(len(records)):
        r = records[i]
        assert set(r) == {"images", "problem", "answer", "choices", "meta"} and isinstance(r["meta"], dict)
        assert len(r["images"]) == 1 and isinstance(r["images"][0], Image.Image)
        assert r["problem"].count(data.IMAGE_PLACEHOLDER) == 1
        assert isinstance(r["answer"], str) and isinstance(r["choices"], list)


def _box(answer):
    return f"<think>I read the figure.</think> The answer is \\boxed{{{answer}}}."


sigmoid = lambda z: 1 / (1 + math.exp(-z))


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """One SaEI step from the shipped warm start on the synthetic task at the demo's 112x112 images, evaluated on
    16 held-out problems. Returns (checkpoint folder, the after-training evaluation train.main returned)."""
    out = tmp_path_factory.mktemp("demo")
    _, end = train.main(["--model", os.path.join(ROOT, "assets", "tiny-synthetic"), "--dataset", "synthetic",
                         "--min_pixels=12544", "--max_pixels=12544", "--max_response_len=96", "--batch_size=2", "--updates_per_rollout=1",
                         "--n_clean=2", "--n_adv=2", "--eval_limit=16", "--max_steps=1", "--lr=1e-4",
                         "--micro_batch_size=4", "--gradient_checkpointing=False", "--out_dir", str(out)])
    return out / "checkpoint", end


def _run(tmp_path, *args):
    train.main(SMALL_ONE_STEP + list(args) + ["--out_dir", str(tmp_path)])
    return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


# spied on in the training loop: each spy records a call as {"name", "args" (by parameter name), "result"} and
# returns the real function's result; ppo.update's record also keeps a copy of the policy it was given (pi_old).
# Patched where the loop looks them up (train.py imports `sample` by name).
SPIED = [(train, "sample"), (egas, "attack"), (egas, "add_noise"), (rewards, "score"), (train, "merge_groups"),
         (ppo, "update")]


def _spied_run(tmp_path, *args):
    """train.main(SMALL_ONE_STEP + args) with spies on the loop's own functions. Returns (metrics lines, calls)."""
    import copy
    import inspect
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for module, name in SPIED:
            def spy(*a, _real=getattr(module, name), _name=name, **kw):
                bound = inspect.signature(_real).bind(*a, **kw).arguments
                call = {"name": _name, "args": bound}
                if _name == "update":
                    call["pi_old"] = copy.deepcopy(bound["policy"])
                call["result"] = _real(*a, **kw)
                calls.append(call)
                return call["result"]
            mp.setattr(module, name, spy)
        logs = _run(tmp_path, *args)
    return logs, calls


def _one_step(logs, calls):
    """A one-step run's training-step calls by name; its scores are those between the rollouts and the update
    (evaluation scores its greedy answers too)."""
    (log,) = logs
    rollouts = [i for i, c in enumerate(calls) if c["name"] == "sample" and not c["args"].get("greedy")]
    (update,) = [i for i, c in enumerate(calls) if c["name"] == "update"]
    step = {name: [c for c in calls if c["name"] == name] for name in ("attack", "add_noise", "merge_groups", "update")}
    step.update(log=log, sample=[calls[i] for i in rollouts],
                score=[c for c in calls[rollouts[-1] + 1:update] if c["name"] == "score"])
    return step


def _lengths(response_ids, tok):
    """(B, L) sampled ids -> (B,) response lengths up to and including the first stop token (L if none)."""
    is_stop = torch.isin(response_ids, torch.tensor(model_lib.stop_token_ids(tok)))
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1), response_ids.shape[1] - 1)
    return first + 1


def _row_entropy(policy, out, images, lengths):
    """Each row's mean next-token entropy over its first `lengths` response tokens, conditioned on images[row]:
    one plain full-logits forward. out: sample()'s dict; images: one (3, H, W) per row. Returns (B,)."""
    P, L = out["prompt_ids"].shape[1], out["response_ids"].shape[1]
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.cat([out["prompt_ids"], out["response_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], mask], 1)
    pv, grid = data.batch_pixels(images)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=attn, pixel_values=pv, image_grid_thw=grid,
                        mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits[:, P - 1:-1]
    return (_reference_entropy(logits) * mask).sum(1) / mask.sum(1)


# one SaEI step of the warm-started tiny model on the synthetic task, whose rewards differ within a group:
# 2 prompts x (3 clean + 2 adversarial) responses; a large attack step makes the attacked image clearly differ
# from the clean one
SAEI_STEP = ["--model", os.path.join(ROOT, "assets", "tiny-synthetic"), "--dataset", "synthetic",
             "--min_pixels", "12544", "--max_pixels", "12544", "--max_response_len", "48", "--n_clean", "3",
             "--n_adv", "2", "--eval_limit", "1", f"--pgd_alpha={16 / 255}", f"--pgd_eps={16 / 255}"]


@pytest.fixture(scope="module")
def one_saved_step(tmp_path_factory):
    """A finished one-step SMALL run: its checkpoint (step 1) and metrics line. Tests damage copies of it."""
    out = tmp_path_factory.mktemp("one_saved_step")
    train.main(SMALL_ONE_STEP + ["--out_dir", str(out)])
    return out


def _copy(run, to):
    shutil.copytree(run, to)
    return to


@pytest.fixture(scope="module")
def saei_step(tmp_path_factory):
    return _one_step(*_spied_run(tmp_path_factory.mktemp("saei_step"), *SAEI_STEP))


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


def _resp(boxed, think="Let me work it out."):
    return f"<think>{think}</think> The answer is \\boxed{{{boxed}}}."


def _read_grid(image):
    """Re-measure a drawn grid from its pixels alone: each cell's centre pixel -> the nearest palette colour,
    or '.' when it is white. Independent of the generator's own cell string."""
    palette = {letter: rgb for letter, (_, rgb) in data.SYN_COLORS.items()}
    palette["."] = (255, 255, 255)
    cells = ""
    for row in range(data.SYN_GRID):
        for col in range(data.SYN_GRID):
            c = image.getpixel((col * data.SYN_CELL + data.SYN_CELL // 2, row * data.SYN_CELL + data.SYN_CELL // 2))
            cells += min(palette, key=lambda k: sum((a - b) ** 2 for a, b in zip(c, palette[k])))
    return cells


UPDATE_SCRIPT = textwrap.dedent("""
    # Same fixed rollouts on 1 rank or split over 2: the token-mean loss and the gradients must agree.
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import distributed, egas, ppo, train
    from model import load_policy
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # two prompts x (2 clean + 2 adversarial) responses; micro-batches of 3 rows that share their prompt's encoding
    cfg = type("Config", (), dict(train.DEFAULTS, device="cpu", micro_batch_size=3, n_clean=2, n_adv=2,
                                  gradient_checkpointing=False))
    if world > 1:  # the process group of a GPU run, with gloo standing in for NCCL on the one device NCCL serves:
        # a collective handed a tensor on a device the group has no backend for fails here as under NCCL
        from torch.distributed.distributed_c10d import BackendConfig
        init, calls = torch.distributed.init_process_group, []
        def gpu_like(backend, **kw):
            # NCCL learns this rank's GPU from the group, after torch.cuda.set_device picked it (a CPU build of
            # torch refuses a CUDA device_id, so it is checked here and not passed on)
            assert calls == [f"cuda:{{os.environ['LOCAL_RANK']}}"], calls
            assert kw.pop("device_id") == torch.device(calls[0])
            served = BackendConfig(backend).get_device_backend_map()  # "nccl" -> {{"cuda": "nccl"}}
            init(",".join(f"{{d}}:{{'gloo' if b == 'nccl' else b}}" for d, b in served.items()), **kw)
        torch.distributed.init_process_group, torch.cuda.set_device = gpu_like, calls.append
        cfg.device = "cuda"
    rank, world = distributed.setup_distributed(cfg)
    loads = []  # how many times this rank reads the model: under torchrun, rank 0 alone
    import model as model_lib
    model_lib.load_policy = lambda *a, load=model_lib.load_policy, **kw: loads.append(1) or load(*a, **kw)
    distributed.load_policy = model_lib.load_policy  # the name distributed.py imported
    if world > 1:
        policy, tok, weights = distributed.load_on_rank0("tiny", rank, seed=0)
        policy.model.visual.requires_grad_(False)
        distributed.shard(policy, torch.float32, "cpu", weights)
    else:
        policy, tok = model_lib.load_policy("tiny", seed=0)
        policy.model.visual.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    B, P, L = 8, 30, 12
    image_tokens = 4  # a 56x56 image: 16 patches, 4 merged tokens
    prompt = torch.randint(10, 100, (B // 4, P), generator=g).repeat_interleave(4, 0)
    prompt[:, 5:5 + image_tokens] = policy.config.image_token_id
    response = torch.randint(10, 100, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    response_mask = (torch.arange(L)[None] < lengths[:, None]).long()
    images = [x for x in [torch.rand(3, 56, 56, generator=g) for _ in range(B // 4)] for _ in range(4)]
    advantages = torch.randn(B, generator=g)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    rollouts = dict(prompt_ids=prompt[rows], prompt_mask=torch.ones_like(prompt[rows]),
                    response_ids=response[rows] * response_mask[rows], response_mask=response_mask[rows])
    no_autocast = lambda: torch.autocast("cpu", enabled=False)
    totals, _ = ppo.policy_update(policy, None, rollouts, advantages[rows], images[rows], cfg, world, no_autocast)
    loss = distributed.all_reduce_sum(torch.tensor(totals["loss"])).item()

    def full_grads(model):
        return {{name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for name, p in model.named_parameters() if p.grad is not None}}

    def attack(model):  # EgAS on this rank's first prompt, its first 2 responses standing in for clean rollouts
        clean = {{k: v[:2] for k, v in rollouts.items()}}
        clean["response_entropy"] = torch.arange(L, dtype=torch.float32).expand(2, L)  # any fixed ranking: by position
        return egas.attack(model.eval(), [images[rows][0]], clean, 2, steps=1, alpha=2 / 255, eps=2 / 255)[1][0]
    grads = full_grads(policy)
    bf16 = None
    if world == 1:
        attack_stats = attack(policy)
    else:  # the update and the attack with FSDP2's bf16 compute weights and autocast off, as on GPUs
        policy16, _, weights = distributed.load_on_rank0("tiny", rank, seed=0)
        policy16.model.visual.requires_grad_(False)
        distributed.shard(policy16, torch.bfloat16, "cpu", weights)
        totals16, _ = ppo.policy_update(policy16, None, rollouts, advantages[rows], images[rows], cfg, world,
                                          no_autocast)
        bf16 = {{"loss": distributed.all_reduce_sum(torch.tensor(totals16["loss"])).item(), "grads": full_grads(policy16),
                 "attack": attack(policy16)}}
    # one optimizer step; then every rank gathers the full weights and reports a checksum of them
    torch.optim.AdamW(policy.parameters(), lr=1e-2).step()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    distributed.reshard(policy) if world > 1 else None
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    checksum = sum(v.double().abs().sum().item() * (i + 1) for i, v in enumerate(full.values()))
    checksums = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(checksums, checksum)
        all_loads = [None] * world
        torch.distributed.all_gather_object(all_loads, len(loads))
        assert all_loads == [2, 0], all_loads  # the fp32 and the bf16 model
    else:
        checksums = [checksum]
    if rank == 0:
        torch.save({{"loss": loss, "grads": grads, "tokens": totals["tokens"], "checksums": checksums,
                     "attack": attack_stats if world == 1 else None, "bf16": bf16}}, sys.argv[1])
    if world > 1:
        distributed.leave_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads at exit sometimes abort ("terminate called ...")
""")


def _torchrun(args, nproc=2, timeout=300):
    import socket
    with socket.socket() as s:  # a free port, so parallel runs never meet at the default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "checkpoint", "model.safetensors"))


def _fixed_rollouts(policy, B=4, P=30, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, 100, (B, P), generator=g)
    prompt[:, 5:9] = policy.config.image_token_id  # a 56x56 image: 4 merged tokens
    response_mask = (torch.arange(L)[None] < torch.randint(3, L + 1, (B,), generator=g)[:, None]).long()
    rollouts = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt),
                    response_ids=torch.randint(10, 100, (B, L), generator=g) * response_mask, response_mask=response_mask)
    return rollouts, [torch.rand(3, 56, 56, generator=g) for _ in range(B)], torch.randn(B, generator=g)


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


@pytest.mark.parametrize("mode, level", [("I;16", 32768), ("I;16", 65535), ("I", 20000), ("I", 128)])
def test_data_high_bit_depth_images_keep_their_brightness(tmp_path, mode, level):
    import numpy as np
    array = np.full((40, 60), level, dtype=np.uint16 if mode == "I;16" else np.int32)
    array[:, :30] = 0  # half black: the mean is half the level
    image = Image.fromarray(array)
    if mode == "I;16":  # a 16-bit grayscale PNG, as PIL reads it back
        image.save(tmp_path / "deep.png")
        image = Image.open(tmp_path / "deep.png")
    assert image.mode == mode
    x = data.load_image(image, 40 * 56, 40 * 56)
    full_scale = 255 if mode == "I" and level <= 255 else 65535
    assert x.mean().item() == pytest.approx(level / full_scale / 2, abs=0.01)


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


def test_data_geometry3k_real_sample():
    raw = datasets.load_dataset("parquet", data_files=GEO3K_SAMPLE, split="train")
    for spec in (f"geometry3k={GEO3K_SAMPLE}", f"geo3k={os.path.dirname(GEO3K_SAMPLE)}"):  # a file, a folder
        records = data.load_records(spec, "test")
        assert len(records) == 6
        _check_shape(records)
        for i in range(6):
            assert records[i]["problem"] == raw[i]["problem"] and records[i]["answer"] == raw[i]["answer"]
            assert records[i]["choices"] == []  # trained free-form: the problem shows no options
            assert records[i]["images"][0].mode == "RGBA" and records[i]["images"][0].size == raw[i]["images"][0].size
    assert records[3]["answer"] == "5 \\sqrt { 3 }"


def test_data_mmk12_splits(copies):
    train = data.load_records(f"mmk12={copies['mmk12']}", "train")
    test = data.load_records(f"mmk12={copies['mmk12']}", "test")
    assert (len(train), len(test)) == (3, 2)
    _check_shape(train)
    _check_shape(test)
    assert train[1]["problem"] == "<image>Solve for x: 2x = 1."  # the placeholder goes first when missing
    assert train[1]["answer"] == "\\frac{1}{2}" and test[0]["answer"] == "-2"
    assert train[0]["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_data_mathvista_testmini(copies):
    records = data.load_records(f"mathvista={copies['mathvista']}", "train")  # one split: testmini, whatever asked
    assert len(records) == 2
    _check_shape(records)
    mc, free = records[0], records[1]
    assert mc["problem"] == ("<image>What is the measure of angle B?\nChoices:\n(A) 30°\n(B) 45°\n(C) 60°\n(D) 90°")
    assert mc["choices"] == ["30°", "45°", "60°", "90°"] and mc["answer"] == "45°"
    assert free["problem"] == "<image>What is the value of the bar labeled x?" and free["choices"] == []
    assert free["images"][0].getpixel((0, 0)) == (0, 0, 255)  # decoded_image, not the file name in `image`


def test_data_mathverse_testmini(copies):
    records = data.load_records(f"mathverse={copies['mathverse']}", "test")
    assert len(records) == 3
    _check_shape(records)
    assert records[0]["choices"] == ["40°", "50°", "130°", "140°"] and records[0]["answer"] == "D"
    assert records[0]["problem"].startswith("<image>As shown in the figure")
    assert records[1]["choices"] == [] and records[1]["answer"] == "10"
    assert records[2]["problem"] == "<image>Answer the question shown in the image."  # Vision Only
    assert records[2]["choices"] == []


def test_data_mathverse_hub_snapshot(copies, tmp_path):
    # a download of the hub repository: README.md names two configs, and datasets wants one of them
    import shutil
    shutil.copy(os.path.join(copies["mathverse"], "testmini.parquet"), tmp_path / "testmini.parquet")
    shutil.copy(os.path.join(copies["mathverse"], "testmini.parquet"), tmp_path / "testmini_text_only.parquet")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: testmini\n  data_files:\n  - split: testmini\n    path: testmini.parquet\n"
        "- config_name: testmini_text_only\n  data_files:\n  - split: testmini_text_only\n"
        "    path: testmini_text_only.parquet\n---\n# MathVerse\n")
    records = data.load_records(f"mathverse={tmp_path}", "test")
    assert len(records) == 3 and records[0]["answer"] == "D"


def test_data_mathvision_test(copies):
    records = data.load_records(f"mathvision={copies['mathvision']}", "test")
    assert len(records) == 2  # the test split, not testmini
    _check_shape(records)
    assert records[0]["problem"] == ("Which of the cubes can be folded from <image>?\n"
                                     "Choices:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5")
    assert records[0]["choices"] == ["1", "2", "3", "4", "5"] and records[0]["answer"] == "C"
    assert records[1]["problem"] == "<image>How many triangles are there in the picture?"
    assert records[1]["choices"] == []


def test_data_hallusionbench_image_split(copies):
    records = data.load_records(f"hallusionbench={copies['hallusionbench']}", "test")
    assert len(records) == 3  # the questions with a figure; non_image is left out
    _check_shape(records)
    assert [records[i]["answer"] for i in range(3)] == ["yes", "no", "no"]
    assert records[0]["problem"] == "<image>Is the left orange circle the same size as the right one?"


def test_data_wemath_testmini_options_split_into_choices(copies):
    records = data.load_records(f"wemath={copies['wemath']}", "test")
    assert len(records) == 2
    _check_shape(records)
    assert records[0]["choices"] == ["6cm²", "8cm²", "10cm²", "12cm²", "No correct answer"]
    assert records[0]["problem"] == ("<image>As shown in the figure, what is the area of the triangle?\nChoices:\n"
                                     "(A) 6cm²\n(B) 8cm²\n(C) 10cm²\n(D) 12cm²\n(E) No correct answer")
    assert records[0]["answer"] == "D" and records[1]["choices"] == ["4π cm", "2π cm", "8π cm"]
    assert records[1]["meta"] == {"ID": "2steps_3", "key": "2-1"}
    # graded as the other multiple-choice benchmarks: the letter or the option's text
    assert rewards.score("\\boxed{D}", records[0]["answer"], records[0]["choices"])["accuracy"] == 1.0
    assert rewards.score("\\boxed{12cm²}", records[0]["answer"], records[0]["choices"])["accuracy"] == 1.0
    assert rewards.score("\\boxed{B}", records[0]["answer"], records[0]["choices"])["accuracy"] == 0.0


def test_data_query_prompts_are_the_fields_the_papers_evaluate_with(copies):
    # prompts="query": MathVista's query (its answer-format hint), MathVerse's query_cot, HallusionBench asked for a
    # boxed yes or no; grading is unchanged (the same answers and options)
    vista = data.load_records(f"mathvista={copies['mathvista']}", "test", prompts="query")
    assert vista[0]["problem"].startswith("<image>Hint: Please answer the question and provide the correct option")
    assert vista[0]["choices"] == ["30°", "45°", "60°", "90°"] and vista[0]["answer"] == "45°"
    verse = data.load_records(f"mathverse={copies['mathverse']}", "test", prompts="query")
    assert verse[0]["problem"].startswith("<image>Please first conduct reasoning") and verse[0]["answer"] == "D"
    assert verse[0]["choices"] == ["40°", "50°", "130°", "140°"] and verse[0]["meta"] == {"problem_version": "Text Dominant"}
    hallu = data.load_records(f"hallusionbench={copies['hallusionbench']}", "test", prompts="query")
    assert hallu[0]["problem"].endswith("same size as the right one?" + data.HALLUSION_ASK)
    assert hallu[0]["meta"] == {"category": "VD", "subcategory": "illusion", "set_id": "0", "figure_id": "0",
                                "question_id": "0"}
    plain = data.load_records(f"hallusionbench={copies['hallusionbench']}", "test")
    assert plain[0]["problem"] == "<image>Is the left orange circle the same size as the right one?"


def test_data_instruction_in_the_system_prompt_or_after_the_problem():
    tok = model_lib.tiny_tokenizer()
    user = tok.decode(data.build_prompt(tok, "<image>How many?", 2))
    system = tok.decode(data.build_prompt(tok, "<image>How many?", 2, role="system"))
    instruction = data.INSTRUCTION.strip()
    assert user.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert f"How many? {instruction}<|im_end|>" in user
    assert system.startswith(f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n")
    assert "How many?<|im_end|>" in system and system.count(instruction) == 1


def test_data_a_missing_answer_is_empty_not_the_word_none(tmp_path):
    features = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string")}
    _table([{"images": [_image("red")], "problem": "<image>Which colour?", "answer": "red"},
            {"images": [_image("blue")], "problem": "<image>How many?", "answer": None}],
           features).to_parquet(str(tmp_path / "mine.parquet"))
    records = data.load_records(str(tmp_path / "mine.parquet"), "test")
    assert records[1]["answer"] == ""
    kept, counts = data.usable_records(records, model_lib.tiny_tokenizer(), 56 * 56, 112 * 112, 10 ** 6)
    assert len(kept) == 1 and counts["empty answer"] == 1


def test_data_local_record_schema(tmp_path):
    features = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string"), "choices": STRINGS}
    _table([{"images": [_image("red")], "problem": "<image>Which colour?", "answer": "red",
             "choices": ["red", "blue"]},
            {"images": [_image("blue")], "problem": "How many squares?", "answer": "4", "choices": []}],
           features).to_parquet(str(tmp_path / "mine" / "test.parquet"))
    for path in (str(tmp_path / "mine"), str(tmp_path / "mine" / "test.parquet")):
        records = data.load_records(path, "test")
        _check_shape(records)
        assert records[0]["choices"] == ["red", "blue"] and records[1]["problem"] == "<image>How many squares?"
    assert len(data.load_records(GEO3K_SAMPLE, "test")) == 6  # a hub-schema parquet also fits the record schema


def test_data_bad_names_fail_clearly(copies, tmp_path):
    with pytest.raises(SystemExit, match="unknown dataset 'geometry4k'"):
        data.load_records("geometry4k", "test")
    with pytest.raises(SystemExit, match="does not exist"):
        data.load_records(f"mathvista={tmp_path / 'nowhere'}", "test")
    with pytest.raises(SystemExit, match="no split 'validation'"):
        data.load_records(f"mmk12={copies['mmk12']}", "validation")


def test_data_offline_hub_empty_and_wrong_columns_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"cannot load dataset 'geometry3k' \(hiyouga/geometry3k, split train\) from "
                                         r"the hub: .*pass a local copy as geometry3k=path") as e:
        data.load_records("geometry3k", "train")
    assert "\n" not in str(e.value)
    k12 = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string")}
    _table([], k12).to_parquet(str(tmp_path / "empty.parquet"))  # a valid parquet file with no rows
    with pytest.raises(SystemExit, match="empty.parquet' .split test. has no rows"):
        data.load_records(f"mmk12={tmp_path / 'empty.parquet'}", "test")
    (tmp_path / "zero.parquet").write_bytes(b"")  # not a parquet file at all
    with pytest.raises(SystemExit, match="cannot read dataset .*zero.parquet'"):
        data.load_records(f"mmk12={tmp_path / 'zero.parquet'}", "test")
    _table([{"images": [_image("red")], "question": "<image>How many?", "answer": "3"}],
           {"images": datasets.List(IMAGE), "question": V("string"), "answer": V("string")}).to_parquet(
        str(tmp_path / "renamed.parquet"))  # `problem` is called `question` here
    with pytest.raises(SystemExit, match="has no column 'problem' .it has images, question, answer."):
        data.load_records(f"mmk12={tmp_path / 'renamed.parquet'}", "test")


def test_data_inline_choices():
    assert data._inline_choices("Find x.\nChoices:\nA:40°\nB:50°\nC:60°") == ["40°", "50°", "60°"]
    assert data._inline_choices("Which?\nChoices:\nA. 5 cm\nB. 5 m") == ["5 cm", "5 m"]
    assert data._inline_choices("Find x.\nChoices:\nA:1\nC:3") == []  # a gap: not read as options
    assert data._inline_choices("Find the length of AC.") == []


def test_data_usable_records_drops_long_prompts_and_counts(capsys):
    from model import tiny_tokenizer
    tok = tiny_tokenizer()
    records = data.load_records(f"geometry3k={GEO3K_SAMPLE}", "test")
    lo, hi = 28 * 28 * 4, 28 * 28 * 64
    lengths = []
    for i in range(len(records)):  # the real path: resize the image, build the prompt
        x = data.load_image(records[i]["images"][0], lo, hi)
        lengths.append(len(data.build_prompt(tok, records[i]["problem"], data.n_image_tokens(x))))
    limit = sorted(lengths)[2]
    kept, counts = data.usable_records(records, tok, lo, hi, limit)
    expected = [i for i, n in enumerate(lengths) if n <= limit]
    assert counts == {"kept": len(expected), "dropped": 6 - len(expected),
                      f"prompt over {limit} tokens": 6 - len(expected)} and 0 < len(expected) < 6
    assert [kept[j]["problem"] for j in range(len(kept))] == [records[i]["problem"] for i in expected]
    assert f"{len(expected)} of 6 rows usable; skipped: {6 - len(expected)} prompt over {limit} tokens" in capsys.readouterr().out
    _check_shape(kept)  # still records, still lazy
    assert data.usable_records(records, tok, lo, hi, 10 ** 6)[1] == {"kept": 6, "dropped": 0}


def test_data_bad_rows_are_skipped_with_counted_reasons(tmp_path, capsys):
    import io
    from PIL import Image
    from model import tiny_tokenizer
    tok = tiny_tokenizer()
    good = Image.new("RGB", (60, 40), "white")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    truncated = Image.open(io.BytesIO(png.getvalue()[:60]))  # a PNG cut short: the header reads, the pixels do not
    rows = [
        {"images": [good], "problem": "<image>ok", "answer": "1"},
        {"images": [Image.new("L", (50, 70), 128)], "problem": "gray", "answer": "2"},  # grayscale: usable
        {"images": [Image.new("RGBA", (30, 30), (0, 0, 0, 0))], "problem": "rgba", "answer": "3"},  # usable
        {"images": [], "problem": "<image>no image", "answer": "1"},
        {"images": [truncated], "problem": "<image>corrupt", "answer": "1"},
        {"images": [Image.new("RGB", (3000, 10))], "problem": "<image>strip", "answer": "1"},  # aspect ratio 300
        {"images": [good], "problem": "<image>empty answer", "answer": "  "},
        {"images": [good, good], "problem": "<image> and <image>", "answer": "1"},
        {"images": [good], "problem": "<image> and <image>", "answer": "1"},
        {"images": [good], "problem": "<image>sneaky <|image_pad|>", "answer": "1"},
    ]
    kept, counts = data.usable_records(rows, tok, 56 * 56, 28 * 28 * 16, 10 ** 6, name="fixture")
    assert [r["problem"] for r in kept] == ["<image>ok", "gray", "rgba"]
    assert counts == {"kept": 3, "dropped": 7, "missing image": 1, "unreadable image (OSError)": 1,
                      "aspect ratio over 200": 1, "empty answer": 1, "more than one image": 2,
                      "special token in the problem text": 1}
    assert "fixture: 3 of 10 rows usable; skipped: " in capsys.readouterr().out
    for r in kept:  # and what is kept really goes through the pixel pipeline
        x = data.load_image(r["images"][0], 56 * 56, 28 * 28 * 16)
        assert x.shape[0] == 3 and data.image_to_pixels(x)[0].shape[1] == 1176
    with pytest.raises(SystemExit, match="fixture: no usable row"):
        data.usable_records(rows[3:], tok, 56 * 56, 28 * 28 * 16, 10 ** 6, name="fixture")


def _bad_first_rows(tmp_path):
    """Local datasets in the record schema whose first row is bad in each way a row can be, the second one good.
    Returns name -> path."""
    import io
    png = io.BytesIO()
    Image.new("RGB", (60, 40), "red").save(png, format="PNG")
    good = {"bytes": png.getvalue(), "path": None}
    schema = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string")}
    bad = {"undecodable": ({"images": [{"bytes": b"not an image", "path": None}], "problem": "<image>a", "answer": "1"},
                           schema),
           "no_problem": ({"images": [good], "problem": None, "answer": "1"}, schema),
           "strip": ({"images": [Image.new("RGB", (3000, 10))], "problem": "<image>a", "answer": "1"}, schema),
           # an `images` column of single images, not lists: read as one image each
           "single_images": ({"images": good, "problem": "<image>a", "answer": "1"}, dict(schema, images=IMAGE))}
    paths = {}
    for name, (row, features) in bad.items():
        second = dict(row, images=good if features["images"] == IMAGE else [good], problem="<image>b", answer="2")
        paths[name] = str(tmp_path / f"{name}.parquet")
        _table([row, second], features).to_parquet(paths[name])
    return paths


def test_data_a_bad_first_row_is_skipped_and_counted_like_any_other(tmp_path):
    from model import tiny_tokenizer
    tok = tiny_tokenizer()
    expected = {"undecodable": "unreadable row (UnidentifiedImageError)", "no_problem": "missing problem",
                "strip": "aspect ratio over 200", "single_images": None}
    for name, path in _bad_first_rows(tmp_path).items():
        kept, counts = data.usable_records(data.load_records(path, "test"), tok, 3136, 12544, 10 ** 6, name=name)
        if expected[name] is None:
            assert counts == {"kept": 2, "dropped": 0}, name
        else:
            assert counts == {"kept": 1, "dropped": 1, expected[name]: 1}, name
        assert kept[len(kept) - 1]["problem"] == "<image>b"
        _check_shape(kept)


def test_data_configs_assign_train_constants():
    import configurator
    import train
    files = sorted(glob.glob(os.path.join(os.path.dirname(data.__file__), "config", "*.py")))
    # the hub recipes; demo.py and collapse.py are the offline runs, study_*.py compare.py's studies (tested with
    # compare.py) and warmstart_*.py warmstart.py's (tested with warmstart.py)
    offline = {"demo.py", "collapse.py"}
    recipes = [f for f in files if os.path.basename(f) not in offline
               and not os.path.basename(f).startswith(("study_", "warmstart_"))]
    names = {f"{run}{size}.py" for run in ("geo3k_saei", "geo3k_grpo", "mmk12_saei") for size in ("", "_3b")}
    assert {os.path.basename(f) for f in recipes} == names
    for name in offline:  # offline runs: only train.py's names, on a synthetic task, from a shipped warm start
        cfg = configurator.override(train.DEFAULTS, [os.path.join(os.path.dirname(data.__file__), "config", name)])
        assert cfg["dataset"] in data.SYNTHETIC_TASKS and os.path.isdir(cfg["model"]), name
    for f in recipes:
        cfg = configurator.override(train.DEFAULTS, [f])  # only train.py's names, with train.py's types
        assert cfg["dataset"] in data.SOURCES
        assert cfg["model"] == ("Qwen2.5-VL-3B" if f.endswith("_3b.py") else "Qwen2.5-VL-7B")
        assert (cfg["n_clean"], cfg["n_adv"]) == ((12, 0) if "grpo" in f else (6, 6))
        update = (cfg["lr"], cfg["weight_decay"], cfg["clip_low"], cfg["clip_high"], cfg["kl_coef"])
        assert update == (1e-6, 1e-2, 0.2, 0.2, 0.0)
        assert (cfg["temperature"], cfg["max_prompt_len"], cfg["max_response_len"]) == (1.0, 2048, 2048)
        assert (cfg["min_pixels"], cfg["max_pixels"], cfg["freeze_vision"]) == (262144, 1000000, True)


def test_data_synthetic_deterministic_per_seed():
    a, b = data.synthetic_split("train", n=20, seed=3), data.synthetic_split("train", n=20, seed=3)
    assert [r["problem"] for r in a] == [r["problem"] for r in b]
    assert [r["solution"] for r in a] == [r["solution"] for r in b]
    assert all(x["images"][0].tobytes() == y["images"][0].tobytes() for x, y in zip(a, b))
    c = data.synthetic_split("train", n=20, seed=4)
    assert [r["solution"] for r in a] != [r["solution"] for r in c]  # another seed, other problems
    assert len(data.synthetic_split("test")) == data.SYN_SIZES["test"]


def test_data_synthetic_answers_match_the_pixels():
    names = {name: letter for letter, (name, _) in data.SYN_COLORS.items()}
    records = data.synthetic_split("test", n=200)
    for r in records:
        image = r["images"][0]
        assert image.size == (112, 112) and image.mode == "RGB"
        cells = _read_grid(image)
        asked = names[re.search(r"How many (\w+) squares", r["problem"]).group(1)]
        assert r["answer"] == str(cells.count(asked))
        # the worked solution reads out the measured grid, row by row
        think = re.fullmatch(r"<think>(.*)</think>.*", r["solution"]).group(1)
        assert think.split() == [cells[i:i + data.SYN_GRID] for i in range(0, 16, data.SYN_GRID)]
    # every answer 0..6 occurs, none dominates: looking at the image is needed
    counts = [sum(r["answer"] == str(k) for r in records) for k in range(data.SYN_MAX_COUNT + 1)]
    assert min(counts) > 0 and max(counts) < 0.3 * len(records)


def test_data_synthetic_records_fit_the_pipeline():
    """The image reaches the model unresized (one visual token per cell) and the record passes check_record."""
    from model import tiny_tokenizer
    tok = tiny_tokenizer()
    r = data.load_records("synthetic", "test")[0]
    assert "<image>" in r["problem"] and r["choices"] == []
    x = data.load_image(r["images"][0], 112 * 112, 112 * 112)
    assert x.shape == (3, 112, 112) and data.n_image_tokens(x) == 16
    assert torch.equal((x * 255).round().byte().permute(1, 2, 0).flatten(), torch.tensor(list(r["images"][0].tobytes()), dtype=torch.uint8))
    assert data.check_record(r, tok, 112 * 112, 112 * 112, 2048) is None


def test_data_synthetic_train_test_disjoint():
    def keys(split, n):
        return {(r["problem"], r["images"][0].tobytes()) for r in data.synthetic_split(split, n=n)}
    train, val, test = keys("train", 2000), keys("validation", 200), keys("test", 500)
    assert not train & test and not train & val and not val & test
    assert len(test) > 450  # few repeats inside a split either


def test_data_synthetic_solution_scores_full_reward():
    for r in data.synthetic_split("train", n=50) + data.synthetic_split("test", n=50):
        assert rewards.score(r["solution"], r["answer"]) == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
        wrong = str((int(r["answer"]) + 1) % 7)
        assert rewards.score(r["solution"].replace("{" + r["answer"] + "}", "{" + wrong + "}"), r["answer"])["accuracy"] == 0.0


def test_data_synthetic_score_answers_follow_from_the_pixels_and_the_counts():
    records = data.synthetic_split("test", n=300, task="synthetic_score")
    orders = set()
    for r in records:
        cells = _read_grid(r["images"][0])
        red, blue = cells.count("r"), cells.count("b")
        assert r["answer"] == str(3 * red + blue)  # 3 per red, 1 per blue, green none
        assert r["solution"] in (f"<think>red{red} blue{blue} 3*{red}+{blue}={r['answer']}</think>\\boxed{{{r['answer']}}}",
                                 f"<think>blue{blue} red{red} {blue}+3*{red}={r['answer']}</think>\\boxed{{{r['answer']}}}")
        assert data.score_consistent(r["solution"]) and rewards.score(r["solution"], r["answer"])["overall"] == 1.0
        orders.add(r["solution"][7])
    assert orders == {"r", "b"}  # two valid solution orders
    # the answer space: chance pass@12 far below 1
    answers = {r["answer"] for r in records}
    assert len(answers) >= 30 and max(sum(r["answer"] == a for r in records) for a in answers) < 0.1 * len(records)
    test = {r["images"][0].tobytes() for r in records}
    assert not test & {r["images"][0].tobytes() for r in data.synthetic_split("train", n=1000, task="synthetic_score")}
    assert len(data.load_records("synthetic_score", "validation")) == data.SYN_SIZES["validation"]


def test_data_score_consistent_checks_the_answer_against_the_responses_own_counts():
    # the counts say 2 red and 1 blue (score 7), in either order, whatever the arithmetic wrote after them
    assert data.score_consistent("<think>red2 blue1 3*2+1=7</think>\\boxed{7}")
    assert data.score_consistent("<think>blue1 red2 1+3*2=7</think>\\boxed{ 7 }")
    assert data.score_consistent("<think>red2 blue1 3*2+1=8</think>\\boxed{7}")  # wrong arithmetic, right box
    assert not data.score_consistent("<think>red2 blue1 3*2+1=7</think>\\boxed{8}")
    assert not data.score_consistent("<think>red1 blue1 3*1+1=4</think>\\boxed{7}")  # right box, not its counts
    assert not data.score_consistent("<think>red2 3*2=6</think>\\boxed{7}")  # no blue count
    assert not data.score_consistent("<think>red2 red1 3*2+1=7</think>\\boxed{7}")  # red twice, no blue
    assert not data.score_consistent("<think>red2 blue1 3*2+1=7</think>")  # no answer
    assert not data.score_consistent("<think>7</think>red2 blue1 \\boxed{7}")  # counts after </think> do not count
    assert data.score_counts("<think>red2 blue1 3*2+1=7</think>\\boxed{7} red5") == [10, 16]  # only in <think>
    assert data.score_counts("<think>blue1 red2 1+3*2=7</think>\\boxed{7}") == [11, 16]


# ----------------------------------------------------------------------------- model.py

def test_model_unknown_name_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model 'Qwen9-VL'"):
        model_lib.load_policy("Qwen9-VL")
    with pytest.raises(SystemExit, match="does not exist"):
        model_lib.load_policy("./no/such/checkpoint")


def _reference_entropy(logits, temperature=1.0):
    """Entropy in nats of softmax(logits / T), written out plainly: the reference the code is checked against."""
    p = torch.softmax(logits.float() / temperature, -1)
    return -(p * torch.log_softmax(logits.float() / temperature, -1)).sum(-1)


def test_model_entropy_from_logp_is_the_formula():
    for temperature in (1.0, 0.7):
        logits = torch.randn(3, 5, 40) * 3
        p = torch.softmax(logits / temperature, -1)
        logp = torch.log_softmax(logits / temperature, -1)
        assert torch.allclose(model_lib.entropy_from_logp(logp.clone()), -(p * p.log()).sum(-1), atol=1e-6)
    assert math.isclose(model_lib.entropy_from_logp(torch.log_softmax(torch.zeros(50), -1)).item(), math.log(50),
                        rel_tol=1e-6)
    suppressed = torch.log_softmax(torch.tensor([0.0, 0.0, -math.inf, -math.inf]), -1)  # 0 log 0 counts for 0
    assert model_lib.entropy_from_logp(suppressed).item() == pytest.approx(math.log(2))


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


def test_model_patch_projection_is_the_conv3d_it_replaces(tiny, tmp_path):
    policy, tok = tiny
    embed = policy.model.visual.patch_embed
    assert isinstance(embed.proj, model_lib.PatchProjection)
    assert dict(policy.named_parameters())["model.visual.patch_embed.proj.weight"] is embed.proj.weight
    # the stock Conv3d with the same weight: same patch embeddings, same gradient back to the pixels
    conv = torch.nn.Conv3d(3, embed.embed_dim, (2, 14, 14), stride=(2, 14, 14), bias=False)
    conv.weight = embed.proj.weight
    pixels = torch.randn(24, 3 * 2 * 14 * 14, requires_grad=True)
    ours = embed(pixels)
    stock = conv(pixels.view(-1, 3, 2, 14, 14)).view(-1, embed.embed_dim)
    probe = torch.arange(ours.numel()).view_as(ours).sin()  # gradients to the pixels only: the fixture is shared
    (ours_grad,), (stock_grad,) = (torch.autograd.grad((y * probe).sum(), [pixels]) for y in (ours, stock))
    assert ours.shape == (24, embed.embed_dim) and stock.abs().max() > 0.1 and stock_grad.abs().max() > 0.1
    assert torch.allclose(ours, stock, atol=1e-5) and torch.allclose(ours_grad, stock_grad, atol=1e-5)
    # its checkpoint is the stock one: plain transformers loads it with its Conv3d and embeds alike
    policy.save_pretrained(tmp_path)
    plain = model_lib.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert isinstance(plain.model.visual.patch_embed.proj, torch.nn.Conv3d)
    with torch.no_grad():
        assert torch.allclose(plain.model.visual.patch_embed(pixels), ours, atol=1e-5)


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


def test_model_sample_cuts_each_response_after_its_first_stop_token(rollouts):
    # a response ends at its first <|im_end|> or <|endoftext|>, kept; nothing after it is scored or trained on
    _, _, out = rollouts
    tok = model_lib.tiny_tokenizer()
    stops = torch.tensor(model_lib.stop_token_ids(tok))
    ids, mask = out["response_ids"], out["response_mask"]
    L = ids.shape[1]
    lengths = _lengths(ids, tok)
    assert lengths.min() < L and out["truncated"].any()  # some rows stop early, some run to the end
    for row, n in zip(range(ids.shape[0]), lengths.tolist()):
        assert mask[row].tolist() == [1] * n + [0] * (L - n)
        assert not torch.isin(ids[row, :n - 1], stops).any()  # no stop token inside the kept response
        assert (ids[row, n:] == tok.pad_token_id).all()
        assert out["truncated"][row] == (not torch.isin(ids[row, n - 1], stops))


SAMPLE_GATHER_SCRIPT = textwrap.dedent("""
    # Under FSDP2 on 2 ranks: all-gathers during one `sample` call of 8 and of 32 new tokens.
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import data, distributed, train
    from model import load_policy, sample
    from torch.distributed.tensor import DTensor
    dist = torch.distributed
    cfg = type("Config", (), dict(train.DEFAULTS, device="cpu"))
    rank, world = distributed.setup_distributed(cfg)
    policy, tok = load_policy("tiny", seed=0)
    distributed.shard(policy, torch.float32)
    gathers, forwards = [0], [0]
    gather = dist.all_gather_single  # FSDP2's all-gather of a group's weights
    dist.all_gather_single = lambda *a, **kw: (gathers.__setitem__(0, gathers[0] + 1), gather(*a, **kw))[1]
    policy.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    x = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(rank))
    prompt = data.build_prompt(tok, "<image>Describe the picture.", data.n_image_tokens(x))
    result = {{}}
    for new_tokens in (8, 32):
        gathers[0] = forwards[0] = 0
        torch.manual_seed(0)
        out = sample(policy.eval(), tok, [prompt], [x], n=2, max_new_tokens=new_tokens)
        layer = policy.model.language_model.layers[0].mlp.up_proj.weight
        result[new_tokens] = dict(gathers=gathers[0], forwards=forwards[0], resharded=isinstance(layer, DTensor),
                                  longest=int(out["response_mask"].sum(1).max()))
    # the ranks decode very different lengths: with the weights held no forward calls a collective, so neither
    # waits for the other (and the next collective, below, meets both)
    gathers[0] = forwards[0] = 0
    out = sample(policy.eval(), tok, [prompt], [x], n=2, max_new_tokens=4 if rank == 0 else 40)
    uneven = [None] * world
    dist.all_gather_object(uneven, dict(gathers=gathers[0], forwards=forwards[0],
                                        longest=int(out["response_mask"].sum(1).max())))
    result["uneven"] = uneven
    if rank == 0:
        torch.save(result, sys.argv[1])
    distributed.leave_process_group()
    sys.stdout.flush()
    os._exit(0)
""")


def test_model_sample_gathers_each_layer_once_under_fsdp2(tmp_path):
    # FSDP2 reshards every non-root group after its forward: without holding the weights, each generated token
    # re-gathers every layer (7 + 4 per token on this model), ~13 GB per token at 7B
    script = tmp_path / "gather.py"
    script.write_text(SAMPLE_GATHER_SCRIPT.format(root=ROOT))
    run = _torchrun([str(script), str(tmp_path / "counts.pt")])
    assert run.returncode == 0, run.stderr[-3000:]
    short, long = (torch.load(tmp_path / "counts.pt")[n] for n in (8, 32))
    assert long["forwards"] > short["forwards"] + 10 and long["longest"] > 16  # it did generate more tokens
    n_groups = 2 + 4 + 1  # vision blocks, decoder layers, root: each gathered once
    assert short["gathers"] == long["gathers"] == n_groups, (short, long)
    assert short["resharded"] and long["resharded"]  # the shards are back afterwards
    four, forty = torch.load(tmp_path / "counts.pt")["uneven"]
    assert four["longest"] <= 4 < 10 < forty["longest"]  # one forward per token: rank 1 ran many more
    assert forty["forwards"] - four["forwards"] >= forty["longest"] - 4
    assert four["gathers"] == forty["gathers"] == n_groups


@pytest.fixture(scope="module")
def warm():
    """The shipped warm start and four synthetic training prompts: its responses stop at different lengths."""
    policy, tok = model_lib.load_policy(os.path.join(ROOT, "assets", "tiny-synthetic"))
    images, prompts = zip(*[data.prepare(r, tok, 112 * 112, 112 * 112) for r in data.synthetic_split("train", 4)])
    return policy.eval(), tok, list(prompts), list(images)


def _generate(policy, tok, prompts, images, n, max_new_tokens, temperature=1.0, greedy=False):
    """The plain way: transformers' generate on every prompt repeated n times -> (response ids, the entropy of
    each step's sampling distribution), both (k * n, steps)."""
    ids, mask = model_lib.left_pad(prompts, tok.pad_token_id)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    pv, grid = data.batch_pixels([images[r // n] for r in range(ids.shape[0])])
    out = policy.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=model_lib.mm_token_types(policy, ids), output_scores=True,
                          return_dict_in_generate=True,
                          generation_config=model_lib.sampling_config(tok, max_new_tokens, temperature, greedy))
    scores = torch.stack(out.scores, 1)  # logits / T with the vision tokens at -inf: what the tokens are drawn from
    return out.sequences[:, ids.shape[1]:], torch.special.entr(torch.softmax(scores, -1)).sum(-1)


@pytest.mark.parametrize("greedy, temperature", [(True, 1.0), (False, 1.0), (False, 0.7)])
def test_model_decode_draws_the_tokens_generate_draws(warm, monkeypatch, greedy, temperature):
    # sample() encodes each prompt once, grows its cache in place and drops finished rows; generate() encodes each
    # prompt n times. Same seed, same random numbers: the same tokens, and the same distributions to 1e-5.
    policy, tok, prompts, images = warm
    prompts = [prompts[0], prompts[1][3:], prompts[2]]  # one shorter prompt: left padding
    kept = []
    real_keep = model_lib.GrowingLayer.keep
    monkeypatch.setattr(model_lib.GrowingLayer, "keep", lambda self, rows: kept.append(len(rows)) or real_keep(self, rows))
    torch.manual_seed(3)
    ids, entropy = _generate(policy, tok, prompts, images[:3], 4, 80, temperature, greedy)
    torch.manual_seed(3)
    out = model_lib.sample(policy, tok, prompts, images[:3], 4, 80, temperature, greedy)
    n = out["response_mask"].sum(1)
    if temperature == 1.0 and not greedy:  # (greedy answers to these prompts all take 44 tokens, most at T = 0.7 too)
        assert kept and n.min() < n.max()  # rows finished at different steps, and finished rows were dropped
    assert out["response_ids"].shape == ids.shape and torch.equal(out["response_ids"], ids)
    assert torch.allclose(out["response_entropy"], entropy * out["response_mask"], atol=1e-5)


def test_model_sample_records_the_entropy_of_the_distribution_it_samples_from(tiny):
    policy, tok = tiny
    g = torch.Generator().manual_seed(1)
    x, other = torch.rand(3, 56, 56, generator=g), torch.rand(3, 56, 56, generator=g)
    prompt = data.build_prompt(tok, "<image>How many sides?", data.n_image_tokens(x))
    torch.manual_seed(0)
    out = model_lib.sample(policy, tok, [prompt], [x], 3, 16, temperature=0.7)
    recorded = out["response_entropy"]
    assert recorded.shape == out["response_ids"].shape and recorded[out["response_mask"] == 0].eq(0).all()

    def entropy_on(image):  # teacher-forced on `image`: softmax(logits / T), vision tokens excluded
        ids = torch.cat([out["prompt_ids"], out["response_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["response_mask"]], 1)
        pv, grid = data.batch_pixels([image] * 3)
        with torch.no_grad():
            logits = policy.lm_head(model_lib.response_hidden(policy, ids, attn, pv, grid, len(prompt))) / 0.7
        logits[..., model_lib.vision_token_ids(tok)] = -math.inf
        return torch.special.entr(torch.softmax(logits, -1)).sum(-1) * out["response_mask"]
    assert torch.allclose(recorded, entropy_on(x), atol=1e-5)
    assert (recorded - entropy_on(other)).abs().max() > 1e-3  # the image it was sampled on, not another one


def test_model_sample_in_chunks_keeps_the_rows_and_the_answers(tiny):
    policy, tok = tiny
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 56, 56, generator=g), torch.rand(3, 56, 84, generator=g)]
    prompts = [data.build_prompt(tok, q, data.n_image_tokens(x)) for q, x in zip(["<image>How many?", "<image>Area?"], images)]
    whole = model_lib.sample(policy, tok, prompts, images, 3, 20, greedy=True)
    chunked = model_lib.sample(policy, tok, prompts, images, 3, 20, greedy=True, chunk_rows=4)  # calls of 4 and 2 rows
    for key in whole:
        assert torch.equal(whole[key], chunked[key]) if key != "response_entropy" else \
            torch.allclose(whole[key], chunked[key], atol=1e-5), key
    torch.manual_seed(0)
    drawn = model_lib.sample(policy, tok, prompts, images, 3, 20, chunk_rows=2)
    stops = torch.tensor(model_lib.stop_token_ids(tok))
    for row in range(6):  # row i * 3 + j is prompt i's j-th response, whichever call sampled it
        prompt = drawn["prompt_ids"][row][drawn["prompt_mask"][row].bool()]
        assert prompt.tolist() == prompts[row // 3]
        mask, ids = drawn["response_mask"][row], drawn["response_ids"][row]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (ids[n:] == tok.pad_token_id).all()
        assert bool(drawn["truncated"][row]) == (not torch.isin(ids[n - 1], stops))
        assert drawn["response_entropy"][row, n:].eq(0).all() and drawn["response_entropy"][row, :n].gt(0).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_model_decode_bytes_counts_the_cache_decode_allocates_and_the_chunk_follows_the_budget(tiny, monkeypatch,
                                                                                                 autocast):
    policy, tok = tiny
    buffers = []  # every KV buffer one real decode call allocates
    init = model_lib.GrowingLayer.__init__
    def spy(self, keys, values, capacity):
        init(self, keys, values, capacity)
        buffers.append((self.key_buffer.dtype, self.key_buffer.nbytes, self.value_buffer.dtype, self.value_buffer.nbytes))
    monkeypatch.setattr(model_lib.GrowingLayer, "__init__", spy)
    images = [torch.rand(3, 56, 56), torch.rand(3, 56, 56)]
    prompts = [data.build_prompt(tok, "<image>How many?", data.n_image_tokens(x)) for x in images]
    n, new_tokens, P = 3, 12, len(prompts[0])
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model_lib.sample(policy, tok, prompts, images, n, new_tokens)
        key_bytes, value_bytes = (4, 2) if autocast else (4, 4)  # under autocast the keys stay fp32, the values bf16
        assert {(b[0], b[2]) for b in buffers} == ({(torch.float32, torch.bfloat16)} if autocast else {(torch.float32,) * 2})
        a, patches = model_lib.arch(policy.config), 56 * 56 // 14 ** 2
        bytes_of = lambda rows: model_lib.decode_bytes(a, P, new_tokens, rows, patches, key_bytes, value_bytes)
        per_row = bytes_of(n + 1) - bytes_of(n) - 4 * a["vocab"] * 4  # one more row: its cache and 4 (V,) fp32 rows
        assert per_row * 2 * n == sum(b[1] + b[3] for b in buffers)  # 2 prompts x n rows, each (P + new_tokens) long
        # the chunk: the most whole prompts whose decode_bytes fit the budget, at least one
        per_prompt = model_lib.decode_bytes(a, P, new_tokens, n, patches, key_bytes, value_bytes, value_bytes)
        for budget, fits in ((10.5 * per_prompt, 10), (per_prompt, 1), (2 * per_prompt - 1, 1), (0.3 * per_prompt, 1),
                             (64 * per_prompt, 64)):
            assert model_lib.prompts_per_call(policy, P, new_tokens, n, patches, budget) == fits


QWEN_INSTRUCT_GENERATION = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}


@pytest.fixture(scope="module")
def qwen_style_checkpoint(tmp_path_factory):
    """The tiny model saved with the sampling defaults a Qwen2.5-VL instruct checkpoint ships."""
    policy, tok = model_lib.load_policy("tiny", seed=0)
    path = tmp_path_factory.mktemp("qwen_style")
    policy.save_pretrained(path)
    tok.save_pretrained(path)
    json.dump({**QWEN_INSTRUCT_GENERATION, "eos_token_id": model_lib.stop_token_ids(tok),
               "pad_token_id": tok.pad_token_id}, open(path / "generation_config.json", "w"))
    return str(path)


def test_model_sampling_ignores_the_checkpoints_generation_config(qwen_style_checkpoint):
    policy, tok = model_lib.load_policy(qwen_style_checkpoint)
    policy.eval()
    x = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0))
    prompt = data.build_prompt(tok, "<image>How many sides?", data.n_image_tokens(x))
    ids = torch.tensor([prompt])
    pv, grid = data.image_to_pixels(x)
    # the sampling path's processed scores are exactly logits / T, vision tokens at -inf, nothing else
    torch.manual_seed(0)
    out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=model_lib.mm_token_types(policy, ids), output_scores=True,
                          output_logits=True, return_dict_in_generate=True,
                          generation_config=model_lib.sampling_config(tok, 24, temperature=0.7))
    scores, logits = torch.stack(out.scores, 1), torch.stack(out.logits, 1)
    expected = logits / 0.7
    expected[..., model_lib.vision_token_ids(tok)] = -math.inf
    assert scores.shape[1] > 5 and torch.equal(scores.isinf(), expected.isinf())
    assert (scores - expected)[expected.isfinite()].abs().max() < 1e-6
    # greedy through sample() is the argmax of the raw logits at every step (Qwen's repetition penalty would move it)
    greedy = model_lib.sample(policy, tok, [prompt], [x], 1, 40, greedy=True)
    n = int(greedy["response_mask"].sum())
    seq = torch.cat([ids, greedy["response_ids"][:, :n]], 1)
    with torch.no_grad():
        hidden = model_lib.response_hidden(policy, seq, torch.ones_like(seq), pv, grid, len(prompt))
        raw = policy.lm_head(hidden)[0]
    raw[:, model_lib.vision_token_ids(tok)] = -math.inf
    assert n > 10 and raw.argmax(-1).tolist() == greedy["response_ids"][0, :n].tolist()
    # and sampling through sample() draws from the whole distribution (Qwen's top_k=1 would make 4 draws identical)
    torch.manual_seed(0)
    drawn = model_lib.sample(policy, tok, [prompt], [x], 4, 12)["response_ids"]
    assert len({tuple(row.tolist()) for row in drawn}) == 4


@pytest.mark.parametrize("damage, message", [
    ("rm config.json", "no config.json"),
    ("write config.json {not json", "config.json is not valid JSON"),
    ("rm model.safetensors", "no weights"),
    ("truncate model.safetensors", "weight file model.safetensors is truncated"),
    ("write model.safetensors garbage", "weight file model.safetensors is corrupt"),
    ("rm tokenizer.json", "no tokenizer files"),
])
def test_model_broken_local_folder_is_one_line_naming_the_file(qwen_style_checkpoint, tmp_path, damage, message):
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(qwen_style_checkpoint, folder)
    verb, name, *rest = damage.split(" ", 2)
    if verb == "rm":
        os.remove(folder / name)
    elif verb == "truncate":
        with open(folder / name, "r+b") as f:
            f.truncate(os.path.getsize(folder / name) - 100)
    else:
        (folder / name).write_text(rest[0])
    with pytest.raises(SystemExit, match=f"model folder '{re.escape(str(folder))}': {message}") as e:
        model_lib.load_policy(str(folder))
    assert "HF_HUB_OFFLINE" not in str(e.value) and "\n" not in str(e.value)


def test_model_shared_prompt_hidden_under_gradient_checkpointing(rollouts):
    policy, images, out = rollouts
    ids, attn, _ = _rows(out, 0)
    P = out["prompt_ids"].shape[1]
    pv, grid = data.image_to_pixels(images[0])
    expected = model_lib.response_hidden(policy, ids, attn, pv.repeat(3, 1), grid.repeat(3, 1), P)
    policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    images_seen = []  # rows through the vision tower: 3 when every row is encoded, 1 when the prompt is shared
    hook = policy.model.visual.register_forward_hook(
        lambda m, args, kwargs, out: images_seen.append(kwargs.get("grid_thw", args[-1]).shape[0]), with_kwargs=True)
    try:
        hidden = model_lib.shared_prompt_hidden(policy, ids, attn, pv, grid, P)
        with torch.no_grad():  # pi_old's pass: no backward to replay, so the prompt is shared even here
            no_grad = model_lib.shared_prompt_hidden(policy, ids, attn, pv, grid, P)
    finally:
        hook.remove()
        policy.activation_checkpointing_disable()
        policy.eval()
    assert torch.allclose(hidden, expected, atol=1e-5) and hidden.requires_grad
    assert torch.allclose(no_grad, expected, atol=1e-5) and images_seen == [3, 1]


def test_model_chunked_logprobs_equal_full_logits_values_and_gradients():
    torch.manual_seed(0)
    B, L, D, V = 3, 7, 16, 50
    lm_head = torch.nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, L, D, requires_grad=True)
    targets = torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    logp, ent = model_lib.token_logprobs(hidden, lm_head, targets, mask, temperature=0.8, chunk_size=4)
    logits = lm_head(hidden) / 0.8
    ref_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    ref_ent = _reference_entropy(logits) * mask
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    (g,) = torch.autograd.grad((logp * 1.3 + ent).sum(), hidden)
    (g_ref,) = torch.autograd.grad((ref_logp * 1.3 + ref_ent).sum(), hidden)
    assert torch.allclose(g, g_ref, atol=1e-5)
    assert g[1, 4:].abs().sum() == 0  # padding receives no gradient


def test_model_fused_logprobs_weight_gradient_and_detached_weight():
    torch.manual_seed(0)
    B, L, D, V = 2, 9, 8, 300
    lm_head = torch.nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, L, D, requires_grad=True)
    targets, mask = torch.randint(0, V, (B, L)), torch.ones(B, L, dtype=torch.long)
    mask[0, 6:] = 0
    logp, ent = model_lib.token_logprobs(hidden, lm_head, targets, mask, temperature=0.9, chunk_size=4)
    g_h, g_w = torch.autograd.grad((logp * 0.5 - ent).sum(), [hidden, lm_head.weight])
    logits = lm_head(hidden) / 0.9
    ref_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    ref_ent = _reference_entropy(logits) * mask
    r_h, r_w = torch.autograd.grad((ref_logp * 0.5 - ref_ent).sum(), [hidden, lm_head.weight])
    assert torch.allclose(g_h, r_h, atol=1e-5) and torch.allclose(g_w, r_w, atol=1e-5)
    # the attack passes the weight detached: the hidden gradient is the same and no weight gradient exists
    _, ent2 = model_lib.token_logprobs(hidden, lm_head.weight.detach(), targets, mask, temperature=0.9, chunk_size=4)
    (g_h2,) = torch.autograd.grad(-ent2.sum(), hidden)
    (r_h2,) = torch.autograd.grad(-_reference_entropy(lm_head(hidden) / 0.9).mul(mask).sum(), hidden)
    assert torch.allclose(g_h2, r_h2, atol=1e-5) and lm_head.weight.grad is None


def test_model_fused_logprobs_with_bf16_weights_and_autocast_off():
    # FSDP2's compute weights are bf16 with autocast off (GPU runs): backward must not multiply its fp32 gradient
    # by the bf16 weight, and the gradients come back in the inputs' dtypes, close to the fp32 ones
    torch.manual_seed(0)
    N, D, V = 6, 16, 300
    h32, w32 = torch.randn(N, D), torch.randn(V, D) / 4
    targets = torch.randint(0, V, (N,))
    h, w = h32.bfloat16().requires_grad_(True), w32.bfloat16().requires_grad_(True)
    logp, ent = model_lib._HeadLogpEntropy.apply(h, w, targets, 0.9)
    assert logp.dtype == ent.dtype == torch.float32
    g_h, g_w = torch.autograd.grad((logp * 0.5 - ent).sum(), [h, w])
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    h_ref, w_ref = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    logits = h_ref @ w_ref.T / 0.9
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1) * 0.5 - _reference_entropy(logits)
    r_h, r_w = torch.autograd.grad(ref.sum(), [h_ref, w_ref])
    assert (g_h.float() - r_h).abs().max() < 0.02 * r_h.abs().max()
    assert (g_w.float() - r_w).abs().max() < 0.02 * r_w.abs().max()


def test_model_shared_prompt_hidden_equals_response_hidden(rollouts):
    policy, images, out = rollouts
    P = out["prompt_ids"].shape[1]
    assert (out["prompt_mask"][3:] == 0).any()  # the second prompt is left-padded
    for i, x in enumerate(images):
        ids, attn, mask = _rows(out, i)
        pv, grid = data.image_to_pixels(x)
        with torch.no_grad():
            ref = model_lib.response_hidden(policy, ids, attn, pv.repeat(3, 1), grid.repeat(3, 1), P)
            ours = model_lib.shared_prompt_hidden(policy, ids, attn, pv, grid, P)
        valid = mask.bool()
        assert (ours - ref)[valid].abs().max() < 1e-5
    two_prompts = torch.cat([_rows(out, 0)[0][:1], _rows(out, 1)[0][:1]])
    with pytest.raises(ValueError, match="share one prompt"):
        model_lib.shared_prompt_hidden(policy, two_prompts, torch.ones_like(two_prompts), pv, grid, P)


# ----------------------------------------------------------------------------- rewards.py

def test_rewards_extract_nested_braces():
    assert extract_answer(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\frac{2\sqrt{2}}{5}}") == r"\frac{2\sqrt{2}}{5}"
    assert extract_answer(r"\boxed{ 7 }") == "7"


def test_rewards_extract_last_box_counts():
    assert extract_answer(r"first \boxed{3}, then \boxed{4}") == "4"
    assert score(r"<think>t</think> \boxed{3} no wait \boxed{4}", "3")["accuracy"] == 0.0
    assert score(r"<think>t</think> \boxed{4} no wait \boxed{3}", "3")["accuracy"] == 1.0


def test_rewards_extract_missing_empty_unclosed():
    assert extract_answer("the answer is 5") is None
    assert extract_answer(r"\boxed{}") is None
    assert extract_answer(r"\boxed{   }") is None
    assert extract_answer(r"\boxed{5} and then \boxed{\frac{1}{2") is None  # truncated last box
    assert extract_answer("None") is None  # mathruler's extractor would return the string "None"


def test_rewards_fractions():
    assert is_correct(r"\frac{1}{2}", "0.5") and is_correct("0.5", r"\frac{1}{2}")
    assert is_correct(r"\dfrac{1}{2}", r"\frac{1}{2}")
    assert is_correct("1/2", r"\frac{1}{2}")
    assert not is_correct(r"\frac{1}{3}", "0.5")
    assert not is_correct("2/4", r"\frac{1}{2}")  # mathruler refuses unreduced fractions


def test_rewards_degrees_and_units():
    for given in [r"80^\circ", r"80^{\circ}", "80°", "80 °", "80 degrees"]:
        assert is_correct(given, "80"), given
    assert not is_correct(r"40^\circ", "80") and not is_correct("40°", "80")
    assert is_correct("5 cm", "5") and is_correct(r"5\text{ cm}", "5")
    assert not is_correct("6 cm", "5")


def test_rewards_spaced_latex_from_dataset():
    # Geometry3K writes answers with spaces around braces; compact and equivalent forms must match
    assert is_correct(r"5\sqrt{3}", r"5 \sqrt { 3 }")
    assert is_correct(r"\sqrt{75}", r"5 \sqrt { 3 }")
    assert is_correct(r"\frac{2\sqrt{2}}{5}", r"\frac { 2 \sqrt { 2 } } { 5 }")
    assert is_correct(r"\frac{2}{5}\sqrt{2}", r"\frac { 2 \sqrt { 2 } } { 5 }")
    assert not is_correct(r"5\sqrt{2}", r"5 \sqrt { 3 }")
    assert not is_correct(r"\frac{\sqrt{2}}{5}", r"\frac { 2 \sqrt { 2 } } { 5 }")


def test_rewards_choice_letters():
    choices = ["8", "10", "12", "13.5"]
    for given in ["B", "(B)", "B.", r"\text{B}"]:
        assert is_correct(given, "10", choices), given
    assert not is_correct("C", "10", choices)
    assert not is_correct("B", "10")  # without choices a letter is just a letter
    assert not is_correct("E", "10", choices)  # out of range
    # the reference may itself be the letter: accept the letter and the option text
    assert is_correct("D", "D", choices) and is_correct("13.5", "D", choices)
    assert is_correct(r"\frac{27}{2}", "D", choices)
    assert not is_correct("A", "D", choices) and not is_correct("8", "D", choices)


def test_rewards_yes_no():
    assert is_correct("Yes", "yes") and is_correct("yes", "Yes") and is_correct("NO", "no")
    assert is_correct(r"\text{No}", "No") and is_correct("Yes.", "Yes")
    assert not is_correct("No", "Yes") and not is_correct("yes", "no")
    assert not is_correct("maybe", "Yes")


def test_rewards_format():
    assert format_ok(_resp("5"))
    assert format_ok("  <think>\nmulti\nline\n</think>\n\\boxed{\\frac{1}{2}}\n")
    assert not format_ok(r"The answer is \boxed{5}.")  # no think
    assert not format_ok(r"Sure. <think>t</think> \boxed{5}")  # text before think
    assert not format_ok("<think>t</think> The answer is 5.")  # no box
    assert not format_ok(r"<think>t</think> \boxed{}")  # empty box
    assert not format_ok(r"<think>t</think> so \boxed{\frac{1}{2")  # truncated at the length limit
    assert not format_ok(r"<think>t \boxed{5}")  # think never closed
    assert not format_ok(r"<think>a</think><think>b</think> \boxed{5}")  # two think blocks
    assert not format_ok(r"<think>a<think>b</think> \boxed{5}")  # nested think


def test_rewards_overall_weights():
    assert (ACCURACY_WEIGHT, FORMAT_WEIGHT) == (0.9, 0.1)
    assert score(_resp("5"), "5") == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
    r = score(r"The answer is \boxed{5}", "5")  # right answer, bad format
    assert r["accuracy"] == 1.0 and r["format"] == 0.0 and abs(r["overall"] - 0.9) < 1e-12
    r = score(_resp("6"), "5")  # wrong answer, good format
    assert r["accuracy"] == 0.0 and r["format"] == 1.0 and abs(r["overall"] - 0.1) < 1e-12
    assert score("<think>t</think> 5", "5") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    assert score(r"<think>t</think> \boxed{}", "5")["overall"] == 0.0


def test_rewards_pathological_answers_stay_fast():
    t0 = time.time()
    assert not is_correct("(99!)!", r"5 \sqrt { 3 }")  # would hang sympy
    assert not is_correct("9**9**9", r"5 \sqrt { 3 }")  # would hang sympy
    assert not is_correct("1" * 300, "1" * 300)  # too long: wrong, even if equal
    assert is_correct("1,\\!000", "1000")  # LaTeX thin space \! is not a factorial
    assert time.time() - t0 < 2.0


def test_rewards_grading_is_bounded_whatever_the_reference():
    def timed(given, answer):
        t0 = time.time()
        return score(_resp(given), answer)["accuracy"], time.time() - t0
    # the reference uses a factorial, so factorials in the answer reach sympy: the exploding ones never do
    for given in ["(99!)!", "10000000!"]:
        accuracy, seconds = timed(given, "5!")
        assert accuracy == 0.0 and seconds < 1.0, (given, seconds)
    # a blow-up no pattern catches (nested powers, allowed with any reference) is cut off after GRADE_SECONDS
    accuracy, seconds = timed("((((((((((9^9)^9)^9)^9)^9)^9)^9)^9)^9)^9)", "5!")
    assert accuracy == 0.0 and seconds < rewards.GRADE_SECONDS + 2.0, seconds
    accuracy, seconds = timed("9**9**9", "2**10")  # a power the reference also uses
    assert accuracy == 0.0 and seconds < rewards.GRADE_SECONDS + 2.0, seconds
    # and grading goes on (in a new grading process): the number 5! stands for, and 5! itself, are right
    assert timed("120", "5!")[0] == 1.0 and timed("5!", "5!")[0] == 1.0 and timed("121", "5!")[0] == 0.0
    assert timed("1024", "2**10")[0] == 1.0 and is_correct("3", r"\frac{6}{2}")


def test_rewards_real_geometry3k():
    ds = load_dataset("parquet", data_files=GEO3K_SAMPLE, split="train")
    assert len(ds) == 6
    letters = "ABCD"
    for row in ds:
        ans, choices, gt = row["answer"], row["choices"], row["ground_truth"]
        assert choices[letters.index(gt)] == ans  # sanity of the sample itself
        assert score(_resp(ans), ans)["overall"] == 1.0
        assert score(_resp(gt), ans, choices)["accuracy"] == 1.0
        # the compact form a model would write (no spaces around braces) is still right
        compact = ans.replace(" {", "{").replace("{ ", "{").replace(" }", "}").replace("} ", "}")
        assert score(_resp(compact), ans, choices)["accuracy"] == 1.0
        for k, wrong in enumerate(choices):
            if letters[k] != gt:
                assert score(_resp(wrong), ans, choices)["accuracy"] == 0.0, (wrong, ans)
                assert score(_resp(letters[k]), ans, choices)["accuracy"] == 0.0


# ----------------------------------------------------------------------------- tsec.py

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

def _attack_one(policy, x, ids, attn, mask, P, entropy, **settings):
    """egas.attack on one prompt given as rows: ids, attn (n, P + L) the prompt and its responses, mask (n, L), the
    entropies sampling recorded (n, L). Returns (x_adv, stats)."""
    rollouts = dict(prompt_ids=ids[:, :P], prompt_mask=attn[:, :P], response_ids=ids[:, P:], response_mask=mask,
                    response_entropy=entropy)
    (x_adv,), (stats,) = egas.attack(policy, [x], rollouts, ids.shape[0], **settings)
    return x_adv, stats


def test_egas_pgd_ascends_a_linear_objective_within_the_ball_and_grid():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 28, 28)).float() / 255
    w = torch.randn(3, 28, 28)
    objective = lambda img: (img * w).sum()
    for steps, alpha, eps in [(1, 2 / 255, 2 / 255), (3, 1 / 255, 2 / 255), (2, -3 / 255, 6 / 255)]:
        (x_adv,) = egas.pgd(lambda imgs: ([objective(imgs[0])], [w]), [x], steps, alpha, eps)
        assert (x_adv - x).abs().max().item() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert torch.allclose(x_adv * 255, (x_adv * 255).round(), atol=1e-4)  # still an 8-bit image
        expected = (x + w.sign() * min(abs(alpha) * steps, eps) * math.copysign(1, alpha)).clamp(0, 1)
        assert torch.allclose(x_adv, (expected * 255).round() / 255, atol=1e-6)
        gain = objective(x_adv) - objective(x)
        assert gain > 0 if alpha > 0 else gain < 0


def test_egas_random_sign_moves_each_pixel_by_the_budget_in_a_coin_flip_direction():
    # the attack's control: the same PGD steps and budget as EgAS, each pixel's direction drawn at random
    cfg = types.SimpleNamespace(pgd_steps=1, pgd_alpha=8 / 255, pgd_eps=8 / 255)
    x = torch.full((3, 20, 20), 128 / 255)
    x[0, 0] = 0.0  # a row of black pixels: a step down is clipped at 0
    name, perturb = egas.PERTURBATIONS["random_sign"]
    torch.manual_seed(0)
    (x_adv,), stats, log = perturb(None, [x], None, 1, cfg)  # never reads the policy or the rollouts
    delta = (x_adv - x) * 255
    assert stats == [] and log == {} and "random" in name
    assert torch.allclose(x_adv * 255, (x_adv * 255).round(), atol=1e-4)  # on the 8-bit grid
    inside = delta[1:]
    assert torch.allclose(inside.abs(), torch.full_like(inside, 8.0), atol=1e-4)  # every pixel moves by alpha
    assert 0.4 < (inside > 0).float().mean() < 0.6  # up or down evenly
    assert set(delta[0, 0].round().tolist()) <= {0.0, 8.0}  # the black row: +8 or clipped at 0
    torch.manual_seed(0)
    assert torch.equal(perturb(None, [x], None, 1, cfg)[0][0], x_adv)  # reproducible under the run's seed
    assert not torch.equal(perturb(None, [x], None, 1, cfg)[0][0], x_adv)  # and a fresh draw each call
    # T steps stay inside the L-inf ball of radius eps, as EgAS's do
    cfg = types.SimpleNamespace(pgd_steps=3, pgd_alpha=4 / 255, pgd_eps=6 / 255)
    (x_adv,), _, _ = perturb(None, [x], None, 1, cfg)
    assert (x_adv - x).abs().max().item() * 255 <= 6 + 1e-4 and x_adv.min() >= 0


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
        entropy = out["response_entropy"][rows]  # what sampling recorded: the band is ranked on it
        x_adv, st = _attack_one(policy, x, ids, attn, out["response_mask"][rows], P, entropy, steps=1, alpha=2 / 255,
                                eps=2 / 255)
        assert (x_adv - x).abs().max() <= 2 / 255 + 1e-6 and not torch.equal(x_adv, x)
        gains.append(st["gain"])
        _, st_down = _attack_one(policy, x, ids, attn, out["response_mask"][rows], P, entropy, steps=1, alpha=-2 / 255,
                                 eps=2 / 255)
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
    _, st = _attack_one(policy, x, ids, attn, out["response_mask"], P, out["response_entropy"], steps=0, alpha=0.0,
                        eps=0.0)
    pv, grid = data.image_to_pixels(x)
    with torch.no_grad():  # straightforward recomputation with full logits
        logits = policy(input_ids=ids, attention_mask=attn, pixel_values=pv.repeat(n, 1), image_grid_thw=grid.repeat(n, 1),
                        mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits
    entropy = _reference_entropy(logits[:, P - 1:-1]) * out["response_mask"]
    # the band: ranked on the entropies sampling recorded, within the group; J: the band's mean entropy
    selected = tsec.select_band(out["response_entropy"], out["response_mask"], group_size=n)
    assert st["objective_clean"] == pytest.approx(tsec.selective_entropy(entropy, selected).item(), abs=1e-5)
    assert st["gain"] == pytest.approx(0.0, abs=1e-6)


def test_egas_attack_falls_back_to_all_tokens_when_the_band_is_empty(tiny):
    policy, tok = tiny
    x = torch.rand(3, 56, 56)
    prompt = data.build_prompt(tok, "<image>q", data.n_image_tokens(x))
    response = tok("7<|im_end|>").input_ids  # 2 tokens: round(2/3) == round(4/3), so the middle band is empty
    ids = torch.tensor([prompt + response])
    mask = torch.ones(1, len(response), dtype=torch.long)
    _, st = _attack_one(policy, x, ids, torch.ones_like(ids), mask, len(prompt), torch.ones(1, len(response)), steps=1,
                        alpha=2 / 255, eps=2 / 255)
    assert st["fallback"] == 1
    pv, grid = data.image_to_pixels(x)
    with torch.no_grad():
        logits = policy(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                             mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits[:, len(prompt) - 1:-1]
    assert st["objective_clean"] == pytest.approx(_reference_entropy(logits).mean().item(), abs=1e-5)
    assert math.isfinite(st["gain"])


def _full_entropy(policy, ids, attn, mask, x, P):
    """(n, L) entropies of n responses to one prompt on image x, by a plain full-logits forward."""
    pv, grid = data.batch_pixels([x] * ids.shape[0])
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=attn, pixel_values=pv, image_grid_thw=grid,
                        mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits[:, P - 1:-1]
    return _reference_entropy(logits) * mask


def test_egas_attack_ranks_the_band_once_on_the_clean_image(rollouts):
    # J(x_adv) is the mean entropy on x_adv of the tokens ranked into the band on the clean x (the entropies
    # sampling recorded): re-ranking on the attacked image would let the attack choose which tokens it is scored on
    policy, images, out = rollouts
    P = out["prompt_ids"].shape[1]
    ids, attn, mask = _rows(out, 0)
    clean_entropy = out["response_entropy"][:3]
    x_adv, st = _attack_one(policy, images[0], ids, attn, mask, P, clean_entropy, steps=1, alpha=32 / 255,
                            eps=32 / 255)
    clean_band = tsec.select_band(clean_entropy, mask, group_size=3)
    entropy_adv = _full_entropy(policy, ids, attn, mask, x_adv, P)
    adv_band = tsec.select_band(entropy_adv, mask, group_size=3)
    expected = tsec.selective_entropy(entropy_adv, clean_band).item()
    assert abs(tsec.selective_entropy(entropy_adv, adv_band).item() - expected) > 1e-4  # the bands differ
    assert st["objective_adv"] == pytest.approx(expected, abs=1e-5)


def test_egas_attacked_image_is_a_valid_8bit_image_for_any_step_size(rollouts):
    # steps that are not whole multiples of 1/255 still end on the 8-bit grid, in [0, 1] and in the eps ball
    policy, images, out = rollouts
    ids, attn, mask = _rows(out, 1)
    x = images[1]
    x_adv, _ = _attack_one(policy, x, ids, attn, mask, out["prompt_ids"].shape[1], out["response_entropy"][3:],
                           steps=1, alpha=1.5 / 255, eps=2 / 255)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    (x_lin,) = egas.pgd(lambda imgs: ([(imgs[0] * w).sum()], [w]), [x], steps=3, alpha=0.7 / 255, eps=2 / 255)
    for y in (x_adv, x_lin):
        assert torch.equal(y, torch.round(y * 255) / 255) and not torch.equal(y, x)
        assert (y - x).abs().max() <= 2 / 255 + 1e-6 and 0 <= y.min() and y.max() <= 1


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


def test_egas_perturbation_size_in_grey_levels():
    x = torch.full((3, 28, 28), 0.5)
    x_adv = x.clone()
    x_adv[0, :2, :2] += 2 / 255   # four pixels up two grey levels
    x_adv[1, 0, 0] -= 3 / 255     # one pixel down three
    linf, l2 = egas.perturbation_size(x, x_adv)
    assert linf == pytest.approx(3.0, abs=1e-4) and l2 == pytest.approx(math.sqrt(4 * 2 ** 2 + 3 ** 2), abs=1e-4)
    assert egas.perturbation_size(x, x) == (0.0, 0.0)


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


@pytest.mark.parametrize("scope,temperature,chunk_size,rows_per_pass", [("group", 1.0, 1024, 1), ("response", 0.7, 5, 2),
                                                                      ("group", 1.0, 1024, 3)])
def test_egas_memory_bounded_objective_and_image_gradient_equal_full_logits(rollouts, scope, temperature, chunk_size,
                                                                            rows_per_pass):
    policy, images, out = rollouts
    P = out["prompt_ids"].shape[1]
    for i, x in enumerate(images):
        ids, attn, mask = _rows(out, i)
        rows = slice(i * 3, (i + 1) * 3)
        selected = tsec.select_band(out["response_entropy"][rows], mask, group_size=3 if scope == "group" else 1)
        objective = egas.tsec_objective(policy, ids, attn, mask, P, selected, temperature=temperature,
                                        chunk_size=chunk_size, rows_per_pass=rows_per_pass)
        value, grad = objective(x, grad=True)
        assert objective(x)[0] == pytest.approx(value, abs=1e-6)
        img_ref = x.clone().requires_grad_(True)
        value_ref = egas.full_logits_objective(policy, img_ref, ids, attn, P, selected, temperature=temperature)
        (grad_ref,) = torch.autograd.grad(value_ref, img_ref)
        assert 0 < selected.sum() < mask.sum()
        assert abs(value - value_ref.item()) < 1e-5
        assert grad_ref.abs().max() > 1e-6 and grad.norm() > 0.5 * grad_ref.norm()  # not a vanishing gradient
        assert (grad - grad_ref).abs().max() < 1e-5
        assert (grad - grad_ref).norm() / grad_ref.norm() < 1e-4  # relative: the gradients are small
    assert all(p.grad is None for p in policy.parameters())


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


def test_grpo_reward_scaling_by_group_batch_or_none_hand_computed():
    # two groups of 2: rewards (1, 0) and (1, 0.5). Centred: +-0.5 and +-0.25. "none" (Dr. GRPO) keeps them;
    # "batch" divides by the std of all four rewards (mean 0.625); "group" by each group's own std
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5])
    centred = torch.tensor([0.5, -0.5, 0.25, -0.25])
    assert torch.allclose(grpo.group_advantages(rewards, 2, scale="none"), centred)
    batch_std = math.sqrt(sum((r - 0.625) ** 2 for r in (1.0, 0.0, 1.0, 0.5)) / 3)
    assert torch.allclose(grpo.group_advantages(rewards, 2, scale="batch"), centred / (batch_std + 1e-6))
    assert torch.allclose(grpo.group_advantages(rewards, 2, scale="batch", batch_std=2.0), centred / (2.0 + 1e-6))
    group = grpo.group_advantages(rewards, 2)
    assert torch.allclose(group, torch.tensor([0.5, -0.5, 0.25, -0.25]) / (torch.tensor([0.7071, 0.7071, 0.3536, 0.3536]) + 1e-6), atol=1e-3)
    assert distributed.global_std(rewards) == pytest.approx(batch_std)  # one process: the plain std
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(rewards, 2, scale="rank")


def test_grpo_equal_rewards_give_exact_zeros_and_count_as_dead():
    # all wrong but formatted (0.1), all right but unformatted (0.9), all right (1.0): 12 responses each, in fp32
    for value in (0.1, 0.9, 1.0, 0.3, 0.7):
        rewards = torch.full((2 * 12,), value)
        rewards[12] = 0.0  # the second group is alive
        adv = grpo.group_advantages(rewards, 12)
        assert adv[:12].eq(0).all(), value
        assert adv[13:].gt(0).all() and adv[12] < 0
        assert grpo.dead_groups(rewards, 12).tolist() == [True, False]


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
    # how far the policy moved from the sampling one: ratio sum and range, KL(old || new) by the k3 estimator
    assert stats["ratio_sum"] == pytest.approx(3.1, rel=1e-6)
    assert (stats["ratio_min"], stats["ratio_max"]) == (pytest.approx(0.5), pytest.approx(1.5))
    assert stats["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)), rel=1e-5)
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


def _cov_example():
    """2 responses x 3 tokens, A = +1 and -1, every token real: log-probs, pi_old chosen for the ratios below."""
    logp = torch.tensor([[-0.1, -1.0, -2.0], [-0.5, -3.0, -0.2]])
    ratio = torch.tensor([[1.5, 0.5, 1.1], [0.7, 2.0, 1.0]])
    return logp, logp - ratio.log(), torch.tensor([1.0, -1.0]), torch.ones(2, 3)


def test_grpo_covariance_and_kl_cov_hand_computed():
    # mean log-prob -6.8 / 6, mean advantage 0: the terms are (logp + 1.1333) * A
    logp, old, adv, mask = _cov_example()
    cov = grpo.covariance(logp, adv, mask)
    m = -6.8 / 6
    expected = torch.tensor([[-0.1 - m, -1.0 - m, -2.0 - m], [-(-0.5 - m), -(-3.0 - m), -(-0.2 - m)]])
    assert torch.allclose(cov, expected, atol=1e-6)
    # KL-Cov takes the k = int(0.34 * 6) = 2 largest terms: (1, 1) at 1.867 and (0, 0) at 1.033
    chosen = grpo.cov_tokens(cov, mask, "kl_cov", ratio=0.34)
    assert chosen.nonzero().tolist() == [[0, 0], [1, 1]]
    assert grpo.cov_tokens(cov, mask, "kl_cov", ratio=2e-4).nonzero().tolist() == [[1, 1]]  # at least one
    padded = mask.clone()
    padded[1, 1] = 0  # padding is never chosen, however large its term
    assert grpo.cov_tokens(cov, padded, "kl_cov", ratio=2e-4).nonzero().tolist() == [[0, 0]]
    # its loss: no clip (ratio 1.5 at A > 0 counts in full) and |log rho| on the chosen tokens, coefficient 1
    logp = logp.clone().requires_grad_(True)
    loss, st = grpo.policy_loss(logp, old, adv, mask, cov_control="kl_cov", cov_ratio=0.34, kl_cov_coef=1.0)
    assert loss.item() == pytest.approx((-1.5 + math.log(1.5) - 0.5 - 1.1 + 0.7 + 2.0 + math.log(2.0) + 1.0) / 6,
                                        abs=1e-6)
    assert st["cov_tokens"] == 2 and st["clipped_tokens"] == 0
    (grad,) = torch.autograd.grad(loss, logp)  # -A rho, plus sign(log rho) = +1 on both chosen tokens
    assert torch.allclose(grad, torch.tensor([[-1.5 + 1, -0.5, -1.1], [0.7, 2.0 + 1, 1.0]]) / 6, atol=1e-6)


def test_grpo_clip_cov_cuts_the_gradient_of_tokens_drawn_within_its_bounds_hand_computed():
    logp, old, adv, mask = _cov_example()
    cov = grpo.covariance(logp, adv, mask)  # [[1.033, 0.133, -0.867], [-0.633, 1.867, -0.933]]
    # bounds (1, 5): (0, 0) at 1.033 and (1, 1) at 1.867 qualify, but the clip already holds (0, 0) (A > 0, ratio
    # 1.5 > 1.2); so Clip-Cov cuts (1, 1) alone. The clip also holds (1, 0) (A < 0, ratio 0.7 < 0.8).
    logp = logp.clone().requires_grad_(True)
    loss, st = grpo.policy_loss(logp, old, adv, mask, cov_control="clip_cov", cov_ratio=2e-4, clip_cov_bounds=(1, 5))
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 0.8 + 0.0 + 1.0) / 6, abs=1e-6)
    assert st["cov_tokens"] == 1 and st["clipped_tokens"] == 2
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, torch.tensor([[0.0, -0.5, -1.1], [0.0, 0.0, 1.0]]) / 6, atol=1e-6)
    # bounds (0.1, 5): two eligible tokens, (0, 1) and (1, 1); k = 1 is drawn at random among them, never another
    held = torch.tensor([[True, False, False], [True, False, False]])
    draws = set()
    for seed in range(20):
        torch.manual_seed(seed)
        draws.add(tuple(map(tuple, grpo.cov_tokens(cov, mask, "clip_cov", 0.2, (0.1, 5), eligible=~held).nonzero().tolist())))
    assert draws == {((0, 1),), ((1, 1),)}
    # asked for more than qualify (k = 3): both, and no more
    assert grpo.cov_tokens(cov, mask, "clip_cov", 0.5, (0.1, 5), eligible=~held).nonzero().tolist() == [[0, 1], [1, 1]]


def test_grpo_kl_penalty():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert grpo.kl_penalty(logp, logp).abs().max() == 0
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = ref - logp
    assert torch.allclose(grpo.kl_penalty(logp, ref), d.exp() - d - 1)
    assert (grpo.kl_penalty(logp, ref) >= 0).all()


# ----------------------------------------------------------------------------- ppo.py

@pytest.mark.parametrize("pg_tokens", ["vepo", "top_entropy"])
def test_ppo_selected_tokens_loss_is_the_mean_over_the_top_20_percent(pg_tokens):
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
    totals, entropy = ppo.policy_update(policy, None, rollouts, advantages, images, cfg, 1,
                                          lambda: torch.autocast("cpu", enabled=False))
    k = torch.tensor([2.0, 2.0, 1.0, 1.0])
    assert totals["tokens"] == 6
    assert totals["loss"] == pytest.approx(-(advantages * k).sum().item() / 6, abs=1e-6)
    if pg_tokens == "top_entropy":  # the two highest-entropy tokens of the first response, and so on
        top = sum(entropy[r].topk(int(k[r])).values.sum().item() for r in range(B))
        assert totals["pg_entropy"] == pytest.approx(top, rel=1e-5)
    else:
        assert totals["jsd"] > 0


def test_ppo_update_sharing_each_prompt_equals_encoding_every_row():
    # the update encodes a prompt once per micro-batch (P + m L tokens) unless gradient checkpointing is on; both
    # ways must give the same loss and gradients, with micro-batches cut at prompt and image boundaries
    from model import load_policy
    g = torch.Generator().manual_seed(1)
    n_clean, n_adv, P, L = 2, 3, 14, 9
    group = n_clean + n_adv
    prompt = torch.randint(10, 100, (2, P), generator=g)
    prompt[:, 2:6] = 0
    prompt = prompt.repeat_interleave(group, 0)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[group:, :2] = 0  # the second prompt is shorter: left padding
    lengths = torch.randint(1, L + 1, (2 * group,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    rollouts = dict(prompt_ids=prompt, prompt_mask=prompt_mask, response_mask=mask,
                    response_ids=torch.randint(10, 100, (2 * group, L), generator=g) * mask)
    advantages = torch.randn(2 * group, generator=g)
    clean = [torch.rand(3, 56, 56, generator=g) for _ in range(2)]
    adv = [x.flip(2) for x in clean]  # logprob_image="adversarial": a group's last n_adv rows see another image
    images = [adv[r // group] if r % group >= n_clean else clean[r // group] for r in range(2 * group)]
    prompt[:, 2:6] = model_lib.tiny_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    # the same rollouts with 4 more left-padding columns and 6 more response-padding columns
    pad = torch.nn.functional.pad
    padded = dict(prompt_ids=pad(prompt, (4, 0)), prompt_mask=pad(prompt_mask, (4, 0)),
                  response_ids=pad(rollouts["response_ids"], (0, 6)), response_mask=pad(mask, (0, 6)))
    results = []
    for checkpointing, batch in ((False, rollouts), (True, rollouts), (False, padded)):
        policy, tok = load_policy("tiny", seed=0)
        cfg = type("Config", (), dict(train.DEFAULTS, device="cpu", micro_batch_size=3, n_clean=n_clean, n_adv=n_adv,
                                      gradient_checkpointing=checkpointing))
        widths = []  # the token width of every forward pass
        hook = policy.model.language_model.embed_tokens.register_forward_pre_hook(
            lambda module, args: widths.append(args[0].shape[1]))
        totals, entropy = ppo.policy_update(policy, None, batch, advantages, images, cfg, 1,
                                              lambda: torch.autocast("cpu", enabled=False))
        hook.remove()
        grads = {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
        results.append((totals["loss"], entropy, grads, widths))
    # each micro-batch is cut to its own prompt and its longest response: the extra columns change nothing
    assert results[2][3] == results[0][3] and max(results[0][3]) <= max(P, lengths.max().item())
    assert results[2][0] == results[0][0] and torch.equal(results[2][1][:, :L], results[0][1])
    assert all(torch.equal(results[2][2][k], results[0][2][k]) for k in results[0][2])
    (shared_loss, shared_entropy, shared_grads, _), (full_loss, full_entropy, full_grads, _) = results[:2]
    assert shared_loss == pytest.approx(full_loss, abs=1e-6) and abs(full_loss) > 1e-4
    assert torch.allclose(shared_entropy, full_entropy, atol=1e-5) and shared_entropy.abs().sum() > 0
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) > 10
    scale = max(v.abs().max().item() for v in full_grads.values())
    assert max((shared_grads[k] - full_grads[k]).abs().max().item() for k in full_grads) < 1e-5 * max(1.0, scale)


def test_ppo_second_mini_batch_is_off_policy_with_ratios_from_pi_old(two_mini_batch_runs):
    run = two_mini_batch_runs[3]
    policy, _ = model_lib.load_policy(WARM[1])
    first, second = run["calls"]
    assert first["old_logp"] is not None and second["old_logp"] is not None
    # pi_old's log-probs, passed to both mini-batches, are those of the weights that sampled (before any update)
    policy.load_state_dict(first["weights"])
    for call in (first, second):
        expected = _logprobs_by_full_forward(policy, call["rollouts"], call["row_images"])
        assert torch.allclose(call["old_logp"][:, :expected.shape[1]], expected, atol=1e-4)
    # the second mini-batch is updated by weights one step later: its ratios are exp(logp_new - logp_old) != 1
    pi_old = _logprobs_by_full_forward(policy, second["rollouts"], second["row_images"])
    policy.load_state_dict(second["weights"])
    pi_new = _logprobs_by_full_forward(policy, second["rollouts"], second["row_images"])
    mask = second["rollouts"]["response_mask"].bool()
    independent = torch.exp(pi_new - pi_old)[mask]
    seen = torch.cat([torch.exp(l["logp"] - l["old"])[l["mask"].bool()] for l in run["losses"] if l["call"] == 1])
    assert torch.allclose(seen, independent, atol=1e-4)
    assert (independent - 1).abs().max() > 1e-3
    first_ratios = torch.cat([torch.exp(l["logp"] - l["old"])[l["mask"].bool()] for l in run["losses"] if l["call"] == 0])
    assert torch.allclose(first_ratios, torch.ones_like(first_ratios), atol=1e-4)  # the first is on-policy
    log = run["log"]
    assert log["ratio_min"] < 1 - 1e-3 or log["ratio_max"] > 1 + 1e-3
    assert log["ratio_min"] <= log["ratio_mean"] <= log["ratio_max"] and log["approx_kl"] > 0


def test_ppo_mini_batch_updates_do_not_depend_on_the_micro_batch_size(two_mini_batch_runs):
    a, b = two_mini_batch_runs[1], two_mini_batch_runs[3]
    assert a["log"]["loss"] == pytest.approx(b["log"]["loss"], abs=1e-6)
    for key in ("ratio_mean", "ratio_min", "ratio_max", "approx_kl", "clip_frac"):
        assert a["log"][key] == pytest.approx(b["log"][key], abs=1e-5), key
    assert max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"]) < 1e-5


def test_ppo_gradient_checkpointing_and_micro_batching_leave_gradients_unchanged():
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
        ppo.policy_update(policy, None, rollouts, advantages, images, cfg, 1, lambda: torch.autocast("cpu", enabled=False))
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 1e-4
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_grpo_clip_of_an_off_policy_pair_hand_computed():
    # 2 tokens per response, A = +1 and A = -1; ratios pi / pi_old of 1.5, 0.5 (A > 0) and 0.5, 1.5 (A < 0).
    # Clipped (zero gradient): a ratio past 1 + 0.2 with A > 0 and below 1 - 0.2 with A < 0. Else the token's loss
    # is -A rho / N, so d/d logp = -A rho / N with N = 4 tokens.
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.5]])).requires_grad_(True)
    loss, st = grpo.policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, torch.tensor([[0.0, -0.5 / 4], [0.0, 1.5 / 4]]), atol=1e-7)
    assert st["clipped_tokens"] == 2 and loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4, abs=1e-6)


def test_grpo_dual_clip_bounds_negative_advantage_tokens_hand_computed():
    # A = -1 on ratios 5, 2 and 0.5; A = +1 on ratio 5. With c = 3 the first token's loss is min(max(5, 1.2), 3) = 3
    # (no gradient); ratio 2 stays -A rho = 2 (d/d logp = rho / N = 2 / 4); ratio 0.5 is held by the ordinary clip at
    # 0.8; positive advantages are untouched by c (ratio 5: clipped at 1.2 as before).
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[5.0, 2.0, 0.5, 5.0]])).requires_grad_(True)
    advantages = torch.tensor([[-1.0, -1.0, -1.0, 1.0]])
    loss, st = grpo.policy_loss(logp, old, advantages, torch.ones(1, 4), clip_dual=3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx((3.0 + 2.0 + 0.8 - 1.2) / 4, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[0.0, 2.0 / 4, 0.0, 0.0]]), atol=1e-7)
    assert st["clipped_tokens"] == 3
    plain, st_plain = grpo.policy_loss(logp, old, advantages, torch.ones(1, 4))  # without it: -A rho = 5, unbounded
    assert plain.item() == pytest.approx((5.0 + 2.0 + 0.8 - 1.2) / 4, abs=1e-6) and st_plain["clipped_tokens"] == 2


def test_ppo_behaviour_ratio_reads_pi_old_on_the_image_each_response_was_sampled_on(rollouts):
    # adv_old_logprob="behaviour": the adversarial half's ratio is pi(o|I) / pi_old(o|I_adv), even with one update
    # (where the paper's convention gives exactly 1); the clean half's stays 1. Checked against teacher forcing.
    policy, images, out = rollouts
    rows = slice(0, 3)  # the first prompt's 3 responses: 1 clean, 2 adversarial (n_clean 1, n_adv 2)
    part = {k: v[rows] for k, v in out.items()}
    x = images[0]
    x_adv = (x + 64 / 255 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)
    cfg = train.get_config(SMALL + ["--n_clean=1", "--n_adv=2", "--adv_old_logprob=behaviour", "--batch_size=1"])
    advantages = torch.tensor([0.5, 1.0, -1.0])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
    params = [p for p in policy.parameters() if p.requires_grad]
    compute = lambda: torch.autocast("cpu", enabled=False)
    policy.train()
    result = ppo.update(policy, None, optimizer, params, part, advantages, [x] * 3, cfg, 1, compute,
                        sampled_on=[x, x_adv, x_adv])
    policy.eval()
    ids, attn, mask = model_lib.sequences(part, slice(None))
    P = part["prompt_ids"].shape[1]

    def logp_on(img):
        pv, grid = data.batch_pixels([img] * 3)
        with torch.no_grad():
            hidden = model_lib.response_hidden(policy, ids, attn, pv, grid, P)
            return torch.log_softmax(policy.lm_head(hidden).float(), -1).gather(-1, part["response_ids"][..., None])[..., 0]
    ratio = torch.exp(logp_on(x) - logp_on(x_adv))[1:]  # the adversarial rows
    valid = mask[1:].bool()
    clipped = ((ratio > 1.2) & (advantages[1:, None] > 0)) | ((ratio < 0.8) & (advantages[1:, None] < 0))
    log = result["log"]
    assert ratio[valid].min() < 0.99 and ratio[valid].max() > 1.01  # the two images give different pi_old
    assert log["ratio_min_adv"] == pytest.approx(ratio[valid].min().item(), rel=1e-4)
    assert log["ratio_max_adv"] == pytest.approx(ratio[valid].max().item(), rel=1e-4)
    assert log["ratio_mean_adv"] == pytest.approx(ratio[valid].mean().item(), rel=1e-4)
    assert log["clip_frac_adv"] == pytest.approx(clipped[valid].float().mean().item(), abs=1e-6)
    n_clean = int(mask[0].sum())  # the clean row's ratio is 1: its pi_old is read on its own image
    assert log["ratio_mean"] * mask.sum().item() == pytest.approx(n_clean + ratio[valid].sum().item(), rel=1e-4)
    # the paper's convention: pi_old read on the clean image for every row, so every ratio is 1
    convention = ppo.update(policy.train(), None, optimizer, params, part, advantages, [x] * 3, cfg, 1, compute)
    policy.eval()
    assert convention["log"]["ratio_min_adv"] == convention["log"]["ratio_max_adv"] == 1.0


def test_ppo_mask_truncated_completions_takes_truncated_responses_out_of_the_loss(rollouts):
    # with mask_truncated_completions the loss and gradients are those of the batch without its truncated rows
    policy, images, out = rollouts
    rows = slice(0, 3)
    part = {k: v[rows] for k, v in out.items()}
    part["truncated"] = torch.tensor([False, True, False])
    advantages = torch.tensor([1.0, -2.0, 0.5])
    compute = lambda: torch.autocast("cpu", enabled=False)

    def grads(batch, adv, masked):
        cfg = train.get_config(SMALL + ["--n_clean=3", "--n_adv=0", f"--mask_truncated_completions={masked}"])
        policy.train()
        totals, _ = ppo.policy_update(policy, None, batch, adv, [images[0]] * adv.shape[0], cfg, 1, compute)
        policy.eval()
        g = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        policy.zero_grad(set_to_none=True)
        return totals["loss"], g
    loss, masked = grads(part, advantages, True)
    kept = [0, 2]
    loss_ref, ref = grads({k: v[kept] for k, v in part.items()}, advantages[kept], False)
    loss_all, everything = grads(part, advantages, False)
    assert loss == pytest.approx(loss_ref, abs=1e-7) and loss_all != pytest.approx(loss_ref, abs=1e-4)
    assert all(torch.allclose(masked[n], ref[n], atol=1e-7) for n in ref)


def test_ppo_non_finite_update_is_skipped_not_applied():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    norm, applied = ppo.optimizer_step(optimizer, [w], 1.0, loss=0.5)
    assert not applied and not math.isfinite(norm) and torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    w.grad = torch.tensor([1.0, 1.0, 0.0])
    _, applied = ppo.optimizer_step(optimizer, [w], 1.0, loss=float("inf"))
    assert not applied and torch.equal(w.detach(), torch.ones(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    norm, applied = ppo.optimizer_step(optimizer, [w], 1.0, loss=0.5)
    assert applied and norm == pytest.approx(5.0) and not torch.equal(w.detach(), torch.ones(3))


# ----------------------------------------------------------------------------- configurator.py

def test_configurator_parses_types_and_files(tmp_path):
    from configurator import override
    defaults = {"lr": 1e-6, "n_adv": 6, "tsec_band": (1 / 3, 2 / 3), "model": "tiny", "resume": False}
    conf = tmp_path / "c.py"
    conf.write_text("lr = 3e-4\nn_adv = 0\n")
    cfg = override(defaults, [str(conf), "--tsec_band=(0.0, 1.0)", "--model", "Qwen2.5-VL-3B", "--resume=True", "--lr=1"])
    assert cfg == {"lr": 1.0, "n_adv": 0, "tsec_band": (0.0, 1.0), "model": "Qwen2.5-VL-3B", "resume": True}
    assert isinstance(cfg["lr"], float)
    # a variant includes its base and states only what it changes; the command line still wins
    (tmp_path / "variant.py").write_text('include("c.py")\nmodel = "Qwen2.5-VL-7B"\n')
    cfg = override(defaults, [str(tmp_path / "variant.py"), "--n_adv=2"])
    assert (cfg["lr"], cfg["n_adv"], cfg["model"]) == (3e-4, 2, "Qwen2.5-VL-7B")
    (tmp_path / "broken.py").write_text('include("missing.py")\n')
    with pytest.raises(SystemExit, match="includes 'missing.py'"):
        override(defaults, [str(tmp_path / "broken.py")])


@pytest.mark.parametrize("text, message", [
    ("lr = 3e-4\nn_adv = (0\n", r"syntax.py:2: "),                      # a syntax error: the file and its line
    ("lr = 3e-4\n\nn_adv = six\n", r"syntax.py:3: NameError: name 'six'"),  # an error while running it
    ("lr = 3e-4\nn_clen = 6\n", r"syntax.py:2: unknown constant 'n_clen'"),
])
def test_configurator_file_errors_name_the_file_and_line(tmp_path, text, message):
    from configurator import override
    conf = tmp_path / "syntax.py"
    conf.write_text(text)
    with pytest.raises(SystemExit, match=message) as e:
        override({"lr": 1e-6, "n_adv": 6}, [str(conf)])
    assert "<string>" not in str(e.value) and "\n" not in str(e.value)


def test_configurator_floats_must_be_finite(tmp_path):
    from configurator import override
    defaults = {"lr": 1e-6, "pgd_alpha": 2 / 255, "tsec_band": (1 / 3, 2 / 3)}
    (tmp_path / "nan.py").write_text("pgd_alpha = float('nan')\n")
    for argv, message in [(["--lr=1e999"], "lr must be finite, got inf"), (["--lr=-1e999"], "lr must be finite"),
                          ([str(tmp_path / "nan.py")], "pgd_alpha must be finite, got nan"),
                          (["--tsec_band=(0.0, 1e999)"], "tsec_band must be finite")]:
        with pytest.raises(SystemExit, match=message):
            override(defaults, argv)
    assert override(defaults, ["--lr=1e-300"])["lr"] == 1e-300  # tiny is finite


# ----------------------------------------------------------------------------- train.py


def test_train_grpo_samples_only_clean_rollouts(tmp_path):
    step = _one_step(*_spied_run(tmp_path, "--n_clean", "4", "--n_adv", "0"))
    log = step["log"]
    assert "entropy_adv" not in log and "attack_gain" not in log and "noise_k" not in log
    # one sampling call, of the n_clean clean responses, and no perturbed image made
    assert [c["args"]["n"] for c in step["sample"]] == [4] and not step["attack"] and not step["add_noise"]
    assert log["entropy"] == pytest.approx(log["entropy_clean"])


def test_train_get_lr_warms_up_then_decays_to_a_tenth():
    assert [train.get_lr(i, 1.0, 10, warmup_iters=4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.get_lr(4, 1.0, 10, 4) == 1.0 and train.get_lr(7, 1.0, 10, 4) == pytest.approx(0.55)
    assert train.get_lr(10, 1.0, 10, 4) == pytest.approx(0.1) and train.get_lr(0, 2.0, 0) == 2.0
    assert [train.get_lr(i, 1.0, None, warmup_iters=2) for i in (0, 1, 50)] == [0.5, 1.0, 1.0]  # lr_decay off


def test_train_warms_the_lr_up_with_lr_decay_off(tmp_path):
    logs, _ = _spied_run(tmp_path, "--max_steps", "3", "--lr=1e-3", "--warmup_steps=2")
    assert [l["lr"] for l in logs] == pytest.approx([0.5e-3, 1e-3, 1e-3])  # linear to lr, then constant


def test_train_noisyrollout_anneals_the_noise_and_lr_decays(tmp_path):
    logs, calls = _spied_run(tmp_path, "--perturb", "noise", "--max_steps", "3", "--lr=1e-3", "--lr_decay=True")
    assert [l["noise_k"] for l in logs] == [499, 250, 0]
    assert [l["lr"] for l in logs] == pytest.approx([1e-3, 0.55e-3, 1e-4])  # cosine from lr to lr / 10
    assert all("attack_gain" not in l and "entropy_adv" in l for l in logs)
    # never the attack; each step's second half is sampled on that step's noisy copies of its clean images
    rollouts = [c for c in calls if c["name"] == "sample" and not c["args"].get("greedy")]
    noise = [c for c in calls if c["name"] == "add_noise"]
    assert not [c for c in calls if c["name"] == "attack"] and len(rollouts) == 6 and len(noise) == 6
    for step, (clean, adv) in enumerate(zip(rollouts[::2], rollouts[1::2])):
        made = noise[2 * step:2 * step + 2]
        assert [c["args"]["k"] for c in made] == [logs[step]["noise_k"]] * 2
        assert all(torch.equal(c["args"]["x"], x) for c, x in zip(made, clean["args"]["images"], strict=True))
        assert all(torch.equal(c["result"], x) for c, x in zip(made, adv["args"]["images"], strict=True))


@pytest.mark.parametrize("args", [[], ["--tsec_band=(0.0, 1.0)"], ["--tsec_scope", "response"]],
                         ids=["saei", "no_tsec", "per_response"])
def test_train_saei_and_its_tsec_ablations_raise_the_entropy(tmp_path, args):
    (log,) = _run(tmp_path, *args)
    assert log["attack_gain"] > 0 and log["tsec_fallback"] == 0


def test_train_distinct_answers_per_group_and_per_half():
    answers = ["1", "1", "2", "3", "3", "3",   # group 0: clean 1, 1, 2; adversarial 3, 3, 3
               "4", "5", "6", "4", "4", None]  # group 1: clean 4, 5, 6; adversarial 4, 4, (no answer)
    assert train.distinct_answers(answers, 6).tolist() == [3.0, 4.0]
    assert train.distinct_answers(answers, 6, 3, first=True).tolist() == [2.0, 3.0]
    assert train.distinct_answers(answers, 6, 3, first=False).tolist() == [1.0, 2.0]


def test_train_reward_reading_pays_a_right_answer_only_when_its_own_counts_give_it():
    record = {"answer": "7", "choices": []}  # a grid with 2 red and 1 blue square
    follows = "<think>red2 blue1 3*2+1=7</think>\\boxed{7}"
    miscounted = "<think>red2 blue2 3*2+2=8</think>\\boxed{7}"  # counts 8, boxes 7
    plain = configurator.get_config(train.DEFAULTS, ["--dataset=synthetic_score"])
    strict = configurator.get_config(train.DEFAULTS, ["--dataset=synthetic_score", "--reward_reading=True"])
    assert train.score(follows, record, plain) == train.score(follows, record, strict) == {
        "overall": 1.0, "accuracy": 1.0, "format": 1.0, "consistent": 1.0}
    assert train.score(miscounted, record, plain)["overall"] == 1.0  # the plain reward grades the box alone
    assert train.score(miscounted, record, strict) == {"overall": pytest.approx(0.1), "accuracy": 1.0, "format": 1.0,
                                                        "consistent": 0.0}  # format only; accuracy is still logged
    assert "consistent" not in train.score(follows, record, configurator.get_config(train.DEFAULTS, []))


def test_train_testbed_metrics_measure_consistency_and_the_entropy_of_the_count_digits():
    cfg = configurator.get_config(train.DEFAULTS, ["--dataset=synthetic_score", "--n_clean=2", "--n_adv=0"])
    texts = ["<think>red2 blue1 3*2+1=7</think>\\boxed{7}",  # states both counts
             "<think>red2 3*2=6</think>\\boxed{7}"]  # states one (and is not consistent)
    length = len(texts[0]) + 1  # the stop token
    mask = torch.zeros(2, length)
    mask[0, :length], mask[1, :len(texts[1]) + 1] = 1, 1
    entropy = torch.full((2, length), 0.5)
    entropy[0, [10, 16]] = torch.tensor([2.0, 1.0])  # the first response: its digits average 1.5, the rest at 0.5
    entropy[1, 10] = 0.25  # the second: its one digit
    rollouts = {"response_mask": mask, "response_entropy": entropy, "truncated": torch.zeros(2, dtype=torch.bool)}
    scores = [train.score(t, {"answer": "7"}, cfg) for t in texts]
    m = train.step_metrics(rollouts, texts, scores, is_adv=torch.zeros(2, dtype=torch.bool), update_entropy=None,
                           group=2, cfg=cfg)
    assert m["consistent_clean"] == 0.5
    assert m["entropy_counts_clean"] == pytest.approx((1.5 + 0.25) / 2)  # per response, then over responses


def test_train_mechanism_metrics_measure_what_each_half_saw(tmp_path, monkeypatch):
    """entropy_adv is the adversarial rollouts' entropy on the image they were sampled on; the distances and the
    gain are those of the images the attack returned. A strong attack (32/255) so the two images differ clearly."""
    calls, attacks = [], []
    real_sample, real_attack = model_lib.sample, egas.attack

    def spy_sample(policy, tok, prompts, images, n, *args, **kwargs):
        out = real_sample(policy, tok, prompts, images, n, *args, **kwargs)
        calls.append(out)
        return out

    def spy_attack(policy, images, *args, **kwargs):
        attacked, stats = real_attack(policy, images, *args, **kwargs)
        attacks.extend(zip(images, attacked, stats))
        return attacked, stats
    monkeypatch.setattr(train, "sample", spy_sample)  # the name train.py calls
    monkeypatch.setattr(egas, "attack", spy_attack)
    (log,) = _run(tmp_path, f"--pgd_alpha={32 / 255}", "--eval_limit=0")
    clean, adv = calls  # one clean and one adversarial sampling call (no evaluation)

    def mean_entropy(out):
        mask = out["response_mask"].float()
        return ((out["response_entropy"] * mask).sum(1) / mask.sum(1)).mean().item()
    assert log["entropy_clean"] == pytest.approx(mean_entropy(clean), abs=1e-6)
    assert log["entropy_adv"] == pytest.approx(mean_entropy(adv), abs=1e-6)
    assert abs(log["entropy_adv"] - log["entropy_adv_on_clean"]) > 1e-4  # on its own image, not the clean one
    sizes = [egas.perturbation_size(x, x_adv) for x, x_adv, _ in attacks]
    assert log["attack_linf"] == pytest.approx(32.0, abs=1e-3) == pytest.approx(sum(s[0] for s in sizes) / 2)
    assert log["attack_l2"] == pytest.approx(sum(s[1] for s in sizes) / 2, rel=1e-6) and log["attack_l2"] > 32
    gains = [st["gain"] for _, _, st in attacks]
    assert log["attack_gain"] == pytest.approx(sum(gains) / 2, rel=1e-6)
    assert log["attack_gain_rel"] == pytest.approx(sum(st["gain"] / st["objective_clean"] for _, _, st in attacks) / 2,
                                                   rel=1e-6)


def test_train_wandb_logs_every_metric_offline(tmp_path, monkeypatch):
    import wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, real_log = [], wandb.sdk.wandb_run.Run.log  # wandb.init rebinds wandb.log to the run's own method

    def spy_log(run, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(run, data, step=step, **kwargs)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy_log)
    logs = _run(tmp_path, "--wandb_log=True", "--wandb_run_name=unit", "--max_steps=2")
    assert [(log["step"], log) for log in logs] == logged  # every line of metrics.jsonl, with its step
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))  # an offline run to `wandb sync`


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


def test_train_attack_budget_is_alpha_times_steps_unless_given():
    assert train.get_config(SMALL).pgd_eps == pytest.approx(2 / 255)
    assert train.get_config(SMALL + ["--pgd_steps=3", "--pgd_alpha=-0.01"]).pgd_eps == pytest.approx(0.03)
    assert train.get_config(SMALL + ["--pgd_steps=3", "--pgd_eps=0.02"]).pgd_eps == pytest.approx(0.02)


def _logprobs_by_full_forward(policy, rollouts, row_images, temperature=1.0):
    """(B, L) response-token log-probs from one plain forward over whole rows: independent of the update's path."""
    ids = torch.cat([rollouts["prompt_ids"], rollouts["response_ids"]], 1)
    attn = torch.cat([rollouts["prompt_mask"], rollouts["response_mask"]], 1)
    pv, grid = data.batch_pixels(row_images)
    P = rollouts["prompt_ids"].shape[1]
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=attn, pixel_values=pv, image_grid_thw=grid,
                        mm_token_type_ids=model_lib.mm_token_types(policy, ids)).logits[:, P - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, rollouts["response_ids"][..., None])[..., 0]
    return logp * rollouts["response_mask"]


@pytest.fixture(scope="module")
def two_mini_batch_runs(tmp_path_factory):
    """One SaEI step whose 2 prompts x 4 responses are updated in 2 mini-batches of one group each, at micro-batch
    sizes 1 and 3; the policy's weights and the update's inputs are recorded at each mini-batch."""
    runs = {}
    for micro in (1, 3):
        calls, losses = [], []
        real_update, real_loss = ppo.policy_update, grpo.policy_loss

        def spy_update(policy, ref, rollouts, advantages, row_images, cfg, *args):
            weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            calls.append({"weights": weights, "rollouts": rollouts, "row_images": row_images, "old_logp": args[-1]})
            return real_update(policy, ref, rollouts, advantages, row_images, cfg, *args)

        def spy_loss(logp, old_logp, advantages, mask, *args):
            losses.append({"call": len(calls) - 1, "logp": logp.detach(), "old": old_logp.detach(), "mask": mask})
            return real_loss(logp, old_logp, advantages, mask, *args)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ppo, "policy_update", spy_update)
            mp.setattr(grpo, "policy_loss", spy_loss)
            path = tmp_path_factory.mktemp(f"micro{micro}")
            train.main(SMALL_ONE_STEP + WARM + ["--updates_per_rollout=2", "--lr=1e-3", f"--micro_batch_size={micro}",
                                                "--eval_limit=0", "--out_dir", str(path)])
        runs[micro] = {"calls": calls, "losses": losses, "log": json.loads(open(path / "metrics.jsonl").readline()),
                       "weights": _weights(path)}
    return runs


@pytest.mark.parametrize("args,message", [
    (["--n_clen=6"], "unknown constant 'n_clen'"),
    (["--n_clean=six"], "n_clean must be int"),
    (["--tsec_band=0.3"], "tsec_band must be tuple"),
    (["--perturb=blur"], "perturb must be one of"),
    (["--n_clean"], "needs a value"),
    (["config/no_such_file.py"], "not found"),
    (["--lr=0"], "lr must be > 0"),
    (["--lr=-1e-4"], "lr must be > 0"),
    (["--temperature=0"], "temperature must be > 0"),
    (["--tsec_band=(0.7, 0.2)"], "tsec_band must be"),
    (["--tsec_band=(-0.1, 0.5)"], "tsec_band must be"),
    (["--tsec_band=(0.1, 0.5, 0.9)"], "tsec_band must be"),
    (["--save_interval=0"], "save_interval must be >= 1"),
    (["--batch_size=0"], "batch_size must be >= 1"),
    (["--micro_batch_size=0"], "micro_batch_size must be >= 1"),
    (["--eval_interval=-1"], "eval_interval must be >= 0"),
    (["--max_steps=0"], "max_steps must be >= 1"),
    (["--max_pixels=1000", "--min_pixels=2000"], "max_pixels .1000. must be >= min_pixels"),
    (["--pgd_steps=-1"], "pgd_steps must be >= 0"),
    (["--pgd_eps=-0.01"], "pgd_eps must be >= 0"),
    (["--dtype=float8"], "dtype must be one of"),
    (["--dataset=geometry4k"], "unknown dataset 'geometry4k'"),
    (["--updates_per_rollout=3"], "batch_size 2 must split into 1 rank.s. x 3 mini-batch"),
    (["--ppo_epochs=0"], "ppo_epochs must be >= 1"),
    (["--rollout_chunk=-1"], "rollout_chunk must be >= 0"),
    (["--max_skipped_updates=0"], "max_skipped_updates must be >= 1"),
    (["--lr=1e999"], "lr must be finite"),
    (["--temperature=1e999"], "temperature must be finite"),
    (["--weight_decay=1e999"], "weight_decay must be finite"),
    (["--device=cuda:99"], "device 'cuda:99' is not available on this machine .* use --device=cpu"),
    (["--device=gpu"], "device 'gpu' is not a torch device"),
    (["--cov_control=kl"], "cov_control must be one of"),
    (["--cov_control=kl_cov"], "kl_cov.*with one update per rollout does nothing"),
    (["--cov_ratio=0"], "need 0 < cov_ratio <= 1"),
    (["--clip_cov_bounds=(5.0, 1.0)"], "clip_cov_bounds"),
    (["--max_filter_tries=-1"], "max_filter_tries must be >= 0"),
    (["--filter_dead_groups=True", "--n_clean=1"], "filter_dead_groups needs n_clean >= 2"),
    (["--filter_dead_groups=True", "--max_filter_tries=0"], "filter_dead_groups needs .* max_filter_tries >= 1"),
    (["--reward_reading=True"], "reward_reading checks a synthetic_score reading, got dataset=.*geometry3k-sample"),
])
def test_train_bad_configuration_is_one_clear_line(args, message, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the configuration was checked")
    monkeypatch.setattr(train, "load_policy", no_load)
    with pytest.raises(SystemExit, match=message) as e:
        train.main(SMALL + args + ["--out_dir", str(tmp_path)])
    assert "\n" not in str(e.value)


SEE_SCRIPT = textwrap.dedent("""
    # rank 0 resumes from argv[1]; rank 1 looks at argv[2], where that checkpoint is not (a node without the
    # shared filesystem): every rank must stop with one line, none may hang or train from scratch
    import json, os, sys
    sys.path.insert(0, {root!r})
    import checkpoint, distributed, train
    rank = int(os.environ["RANK"])
    saved = json.load(open(os.path.join(sys.argv[1], "checkpoint", "training_config.json")))["config"]
    cfg = type("Config", (), dict(saved, resume=True, out_dir=sys.argv[1 + rank]))
    rank, world = distributed.setup_distributed(cfg)
    try:
        checkpoint.start(cfg, rank, world)
        print(f"rank {{rank}} resumes")
    except SystemExit as e:
        print(f"rank {{rank}}: {{e}}")
    sys.stdout.flush()
    os._exit(0)
""")


def _worker_pid(port, rank):
    """The pid of the torchrun worker of `rank` in the run on master port `port` (from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"MASTER_PORT={port}".encode() in env and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(pid)
    return None


def _steps(out_dir):
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_hub_model_while_offline_is_one_clear_line(tmp_path):
    # its own out_dir: a user who ran the demo first has a run in ./out, which train.py would rightly refuse first
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "train.py", "--model", "Qwen2.5-VL-3B", "--max_steps=1",
                          f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
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
    rows = evaluation.main(["--model", str(tmp_path / "live" / "checkpoint"), "--benchmarks", GEO3K_SAMPLE,
                            "--limit", "2", "--max_response_len", "8", "--min_pixels", "3136", "--max_pixels", "12544",
                            "--max_prompt_len", "4096", "--out_dir", str(tmp_path / "eval")])
    assert rows[0]["problems"] == 2


def _update_entropies(step):
    """The update pass's mean token entropy of the clean and of the adversarial responses (rows by the layout
    clean-then-adversarial), and the same recomputed from the sampled responses: clean ones on the clean image,
    adversarial ones on the clean image and on the image they were sampled on."""
    clean, adv = step["sample"]
    (update,) = step["update"]
    policy, tok = update["pi_old"], clean["args"]["tok"]
    nc, na = clean["args"]["n"], adv["args"]["n"]
    ids = update["args"]["rollouts"]["response_ids"]
    lengths = _lengths(ids, tok)
    in_update = update["result"]["entropy"][:, :ids.shape[1]].sum(1) / lengths  # (B,), zero past each response
    is_adv = torch.arange(len(lengths)) % (nc + na) >= nc
    per_row = lambda call, images: [x for x in images for _ in range(call["args"]["n"])]
    recompute = lambda call, images: _row_entropy(policy, call["result"], per_row(call, images),
                                                  _lengths(call["result"]["response_ids"], tok)).mean().item()
    return {"update_clean": in_update[~is_adv].mean().item(), "update_adv": in_update[is_adv].mean().item(),
            "clean_on_clean": recompute(clean, clean["args"]["images"]),
            "adv_on_clean": recompute(adv, clean["args"]["images"]),
            "adv_on_attacked": recompute(adv, adv["args"]["images"])}


def test_train_update_conditions_every_row_on_the_clean_image(saei_step):
    # logprob_image="clean": the update's log-probs (so its entropies) of the adversarial responses are taken on
    # the clean image, not on the attacked image they were sampled on
    e = _update_entropies(saei_step)
    assert abs(e["adv_on_clean"] - e["adv_on_attacked"]) > 1e-3  # the two images give clearly different entropies
    assert e["update_adv"] == pytest.approx(e["adv_on_clean"], abs=1e-5)
    assert e["update_clean"] == pytest.approx(e["clean_on_clean"], abs=1e-5)
    assert saei_step["log"]["entropy_adv_on_clean"] == pytest.approx(e["adv_on_clean"], abs=1e-5)


def test_train_logprob_image_adversarial_conditions_adversarial_rows_on_the_attacked_image(tmp_path):
    e = _update_entropies(_one_step(*_spied_run(tmp_path, *SAEI_STEP, "--logprob_image", "adversarial")))
    assert abs(e["adv_on_clean"] - e["adv_on_attacked"]) > 1e-3
    assert e["update_adv"] == pytest.approx(e["adv_on_attacked"], abs=1e-5)
    assert e["update_clean"] == pytest.approx(e["clean_on_clean"], abs=1e-5)


def test_train_advantages_standardise_each_prompts_whole_group(saei_step):
    # a prompt's n_clean + n_adv responses are one GRPO group: the update's advantages are the rewards
    # standardised over all of a group, not over each half; with pi_old = pi every ratio is 1, so its loss is
    # -sum_r A_r len_r / sum_r len_r
    clean, adv = saei_step["sample"]
    nc, na = clean["args"]["n"], adv["args"]["n"]
    (merged,) = [c["result"] for c in saei_step["merge_groups"]]
    reward = torch.tensor([c["result"]["overall"] for c in saei_step["score"]])
    lengths = _lengths(merged["response_ids"], clean["args"]["tok"]).float()
    loss = lambda advantages: -(advantages * lengths).sum().item() / lengths.sum().item()
    groups = reward.view(-1, nc + na)
    halves = torch.cat([grpo.group_advantages(groups[:, :nc].flatten(), nc).view(-1, nc),
                        grpo.group_advantages(groups[:, nc:].flatten(), na).view(-1, na)], 1).flatten()
    joint = grpo.group_advantages(reward, nc + na)
    assert (joint - halves).abs().max() > 0.1  # the rewards tell the two apart
    (update,) = saei_step["update"]
    assert torch.allclose(update["args"]["advantages"], joint, atol=1e-6)
    assert saei_step["log"]["loss"] == pytest.approx(loss(joint), rel=1e-5, abs=1e-7)
    dead = (groups.std(1) == 0).float().mean().item()
    assert saei_step["log"]["dead_groups"] == dead < 1


def test_train_merge_groups_puts_each_prompts_clean_rows_before_its_adversarial_rows():
    # 2 prompts x (3 clean responses of 3 tokens + 2 adversarial of 5): row r of a batch is all tokens first + r
    def batch(n, L, first):
        ids = (first + torch.arange(2 * n))[:, None].repeat(1, L)
        prompt = (50 + torch.arange(2).repeat_interleave(n))[:, None].repeat(1, 4)
        return {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "response_ids": ids,
                "response_mask": torch.ones_like(ids), "truncated": torch.arange(2 * n) % 2 == 0}
    clean, adv = batch(3, 3, 10), batch(2, 5, 20)
    merged = train.merge_groups(clean, adv, 3, 2, pad_id=0)
    assert merged["response_ids"][:, 0].tolist() == [10, 11, 12, 20, 21, 13, 14, 15, 22, 23]
    assert merged["prompt_ids"][:, 0].tolist() == [50] * 5 + [51] * 5
    assert merged["response_mask"].sum(1).tolist() == [3, 3, 3, 5, 5] * 2
    assert (merged["response_ids"][merged["response_mask"] == 0] == 0).all()  # clean rows padded on the right
    assert merged["truncated"].tolist() == [True, False, True, True, False, False, True, False, True, False]


def test_train_stream_records_give_each_step_its_batch_then_one_reserve_batch_per_filter_round():
    # 30 records, batch_size 4 on 2 ranks (2 each). Without filtering, step 2's rank 1 reads stream positions
    # 4 + 2 = 6, 7 (the stream train.py always read); with 2 filter rounds each step owns 3 batches (12 positions):
    # step 2 starts at 12, its round 1 at 16, rank 1's share at 18, 19; step 3's round 2 starts at 24 + 8 = 32,
    # past the end: it wraps around to 2
    order = list(range(29, -1, -1))  # position p holds record 29 - p
    cfg = types.SimpleNamespace(batch_size=4, filter_dead_groups=False, max_filter_tries=2)
    assert train.stream_records(list(range(30)), order, 2, 0, rank=1, world=2, cfg=cfg) == [23, 22]
    cfg.filter_dead_groups = True
    assert train.stream_records(list(range(30)), order, 2, 1, rank=1, world=2, cfg=cfg) == [11, 10]
    assert train.stream_records(list(range(30)), order, 3, 2, rank=0, world=2, cfg=cfg) == [27, 26]  # 32, 33 -> 2, 3


def test_train_cat_rollouts_pads_prompts_on_the_left_and_responses_on_the_right():
    # part a: one row, prompt [7, 8], response [1]; part b: one row, prompt [5, 6, 9], response [2, 3]
    a = {"prompt_ids": torch.tensor([[7, 8]]), "prompt_mask": torch.ones(1, 2, dtype=torch.long),
         "response_ids": torch.tensor([[1]]), "response_mask": torch.ones(1, 1, dtype=torch.long),
         "response_entropy": torch.tensor([[0.5]]), "truncated": torch.tensor([True])}
    b = {"prompt_ids": torch.tensor([[5, 6, 9]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
         "response_ids": torch.tensor([[2, 3]]), "response_mask": torch.ones(1, 2, dtype=torch.long),
         "response_entropy": torch.tensor([[0.25, 0.75]]), "truncated": torch.tensor([False])}
    out = train.cat_rollouts([a, b], pad_id=0)
    assert out["prompt_ids"].tolist() == [[0, 7, 8], [5, 6, 9]] and out["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert out["response_ids"].tolist() == [[1, 0], [2, 3]] and out["response_mask"].tolist() == [[1, 0], [1, 1]]
    assert out["response_entropy"].tolist() == [[0.5, 0.0], [0.25, 0.75]] and out["truncated"].tolist() == [True, False]


def _marked_reward(text, answer, choices=None):
    """A reward the record decides: 0 for every response to a record whose answer is "dead"; otherwise a number of
    the response's text, which differs between the untrained tiny model's different responses (a live group)."""
    import zlib
    value = 0.0 if answer == "dead" else zlib.crc32(text.encode()) % 1000 / 1000
    return {"overall": value, "accuracy": value, "format": 0.0}


def _marked_stream(path, answers, seed=0):
    """A record-schema parquet whose training stream (train.py's shuffled order for `seed`) reads `answers`
    ("dead" or "live", for _marked_reward) position by position; the record at position p has a grey image of
    level 10 * p, so a test reads a prompt's stream position off its pixels (`_stream_position`)."""
    order = torch.randperm(len(answers), generator=torch.Generator().manual_seed(seed)).tolist()
    position = {record: p for p, record in enumerate(order)}
    rows = [{"images": [_image((10 * position[i],) * 3)], "problem": "<image>Which grey?",
             "answer": answers[position[i]]} for i in range(len(answers))]
    _table(rows, {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string")}).to_parquet(str(path))
    return str(path)


def _stream_position(image):
    return round(image[0, 0, 0].item() * 255 / 10)


@pytest.mark.parametrize("tries, kept, filtered, rounds", [(3, [1, 5], 4, 2), (1, [1, 0], 2, 1)])
def test_train_filter_dead_groups_refills_the_batch_from_the_stream_before_the_attack(tries, kept, filtered, rounds,
                                                                                     tmp_path, monkeypatch):
    # stream positions (batch_size 2): the step's batch 0, 1, then one reserve batch a round: 2, 3; 4, 5; 6, 7.
    # 3 tries: 0 dead (dropped), 1 live (kept); round 1: 2, 3 dead (dropped); round 2: 4 dead (dropped), 5 live:
    # full after 2 rounds, 4 groups dropped, 6 and 7 never sampled. 1 try: after round 1 one prompt is still
    # missing, and the first dead group (0) fills it: 3 dead groups seen, 2 dropped, the trained batch half dead
    monkeypatch.setattr(rewards, "score", _marked_reward)
    stream = _marked_stream(tmp_path / "stream.parquet", ["dead", "live", "dead", "dead", "dead", "live", "live", "live"])
    step = _one_step(*_spied_run(tmp_path / "run", f"--dataset={stream}", "--eval_limit=0",
                                 "--filter_dead_groups=True", f"--max_filter_tries={tries}"))
    positions = lambda images: [_stream_position(x) for x in images]
    assert [positions(c["args"]["images"]) for c in step["sample"]] == \
        [[2 * r, 2 * r + 1] for r in range(rounds + 1)] + [kept]  # the clean rounds, then the adversarial half
    assert positions(step["attack"][0]["args"]["images"]) == kept  # the attack: for the kept prompts only
    assert positions(step["update"][0]["args"]["row_images"])[::4] == kept  # groups of 2 clean + 2 adversarial
    assert (step["log"]["filtered_groups"], step["log"]["filter_rounds"]) == (filtered, rounds)
    assert step["log"]["dead_groups"] == kept.count(0) / 2


def test_train_filter_dead_groups_on_two_ranks_that_need_different_rounds(tmp_path):
    # batch_size 4 on 2 ranks: round r gives rank 0 stream positions 4r, 4r + 1 and rank 1 4r + 2, 4r + 3.
    # Rank 0 is full at once (0, 1 live); rank 1 drops 2, keeps 3, drops 6 and 7 (round 1), keeps 10 (round 2).
    # Rank 0 samples its reserves 4, 5 and 8, 9 too (dead, never looked at), or it would hang rank 1's sampling
    import inspect
    script = tmp_path / "marked.py"
    script.write_text("import os, sys\nsys.path.insert(0, sys.argv[1])\nimport rewards, train\n"
                      + inspect.getsource(_marked_reward)
                      + "rewards.score = _marked_reward\ntrain.main(sys.argv[2:])\nos._exit(0)\n")
    answers = ["live", "live", "dead", "live", "dead", "dead", "dead", "dead", "dead", "dead", "live", "dead"] + ["live"] * 4
    stream = _marked_stream(tmp_path / "stream.parquet", answers)
    run = _torchrun([str(script), ROOT, *SMALL_ONE_STEP, f"--dataset={stream}", "--batch_size=4", "--eval_limit=0",
                     "--filter_dead_groups=True", f"--out_dir={tmp_path / 'run'}"])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (log,) = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert (log["filtered_groups"], log["filter_rounds"], log["dead_groups"]) == (3, 2, 0.0)


def test_train_rows_and_metrics_follow_the_clean_then_adversarial_layout(saei_step):
    # in the loop: prompt i's group is its clean responses, then its adversarial ones, and the per-half metrics
    # (reward_clean, reward_adv) are the rewards of the responses sampled on the clean and on the attacked image
    clean, adv = saei_step["sample"]
    nc, na = clean["args"]["n"], adv["args"]["n"]
    (merged,) = [c["result"] for c in saei_step["merge_groups"]]
    tok = clean["args"]["tok"]
    means = []
    for half, n, offset in [(clean, nc, 0), (adv, na, nc)]:
        out = half["result"]
        L = out["response_ids"].shape[1]
        for r in range(out["response_ids"].shape[0]):
            row = r // n * (nc + na) + offset + r % n
            assert torch.equal(merged["response_ids"][row, :L], out["response_ids"][r])
            assert torch.equal(merged["prompt_ids"][row], out["prompt_ids"][r])
        answers = [saei_step["score"][r // n * (nc + na)]["args"]["answer"] for r in range(out["response_ids"].shape[0])]
        texts = tok.batch_decode(out["response_ids"], skip_special_tokens=True)
        means.append(sum(rewards.score(t, a)["overall"] for t, a in zip(texts, answers)) / len(texts))
    assert means[0] != pytest.approx(means[1])  # the halves' rewards differ, so a swapped layout would show
    assert saei_step["log"]["reward_clean"] == pytest.approx(means[0])
    assert saei_step["log"]["reward_adv"] == pytest.approx(means[1])


def test_train_nothing_after_a_stop_token_is_scored_or_trained_on(saei_step):
    (merged,) = [c["result"] for c in saei_step["merge_groups"]]
    tok = saei_step["sample"][0]["args"]["tok"]
    lengths = _lengths(merged["response_ids"], tok)
    assert lengths.min() < merged["response_ids"].shape[1]  # some response stopped before the longest one
    assert saei_step["log"]["response_len"] == pytest.approx(lengths.float().mean().item())
    texts = [tok.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(merged["response_ids"], lengths)]
    assert [c["args"]["response"] for c in saei_step["score"]] == texts


def test_train_saei_attacks_each_prompt_on_its_clean_rows_and_samples_on_the_result(saei_step):
    clean, adv = saei_step["sample"]
    out, images, nc = clean["result"], clean["args"]["images"], clean["args"]["n"]
    assert adv["args"]["prompts"] == clean["args"]["prompts"] and (nc, adv["args"]["n"]) == (3, 2)
    (call,) = saei_step["attack"]  # one call attacks every prompt of the step
    a, (attacked, stats) = call["args"], call["result"]
    assert len(attacked) == len(stats) == len(images) == 2 and not saei_step["add_noise"]
    assert a["images"] == images and a["n"] == nc
    for key in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "response_entropy"):
        assert torch.equal(a["rollouts"][key], out[key])  # the band is ranked on each prompt's own clean rows
    for x, x_adv, x_seen in zip(images, attacked, adv["args"]["images"], strict=True):
        assert torch.equal(x_seen, x_adv)  # the adversarial rollouts see the attacked image
        assert (x_adv - x).abs().max().item() == pytest.approx(16 / 255, abs=1e-6)  # pgd_eps reached it
        assert torch.equal(x_adv, torch.round(x_adv * 255) / 255)  # a valid 8-bit image
    assert saei_step["log"]["attack_gain"] == pytest.approx(sum(s["gain"] for s in stats) / len(stats))


def test_train_runs_under_accelerate_launch(tmp_path):
    # `accelerate launch` is a wrapper: on CPU it starts one process (its precision and FSDP flags do not reach
    # train.py); on GPUs it calls torchrun. The script must run under it unchanged.
    import shutil
    run = subprocess.run([shutil.which("accelerate"), "launch", "--num_processes=1", "--cpu", "train.py", *SMALL_ONE_STEP,
                          "--eval_limit=0", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "checkpoint" / "config.json").exists() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_train_behaviour_ratio_reads_each_response_on_the_image_it_was_sampled_on(tmp_path):
    step = _one_step(*_spied_run(tmp_path, "--adv_old_logprob=behaviour", f"--pgd_alpha={32 / 255}"))
    clean, adv = step["sample"]
    (update,) = step["update"]
    nc, na = clean["args"]["n"], adv["args"]["n"]
    seen = update["args"]["sampled_on"]
    for row, image in enumerate(seen):
        prompt, j = divmod(row, nc + na)
        half = clean if j < nc else adv  # its group's clean rows, then its adversarial rows
        assert image is half["args"]["images"][prompt]
    assert all(image is clean["args"]["images"][r // (nc + na)] for r, image in enumerate(update["args"]["row_images"]))
    log = step["log"]
    assert log["ratio_min_adv"] < 1 < log["ratio_max_adv"] and 0 <= log["clip_frac_adv"] <= 1
    # the paper's convention (the default) gives the adversarial half a ratio of exactly 1
    (default,) = _run(tmp_path / "default", f"--pgd_alpha={32 / 255}")
    assert default["ratio_min_adv"] == default["ratio_max_adv"] == 1.0 and default["clip_frac_adv"] == 0


def test_train_near_zero_temperature_logs_finite_numbers_only(tmp_path):
    (log,) = _run(tmp_path, "--temperature=1e-9")  # the band's entropy is 0: its relative gain has no value
    assert not {k: v for k, v in log.items() if isinstance(v, float) and not math.isfinite(v)}
    assert "attack_gain_rel" not in log and log["attack_gain"] == 0.0


def test_train_without_held_out_problems_reports_no_accuracy_rather_than_nan(tmp_path, capsys):
    start, end = train.main(SMALL_ONE_STEP + ["--eval_limit=0", "--out_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert start == {"problems": 0, "step": 0} and end == {"problems": 0, "step": 1}
    assert not re.search(r"\bnan\b", printed) and printed.count("not measured (no held-out problems)") == 2
    assert "held-out accuracy: not measured" in (tmp_path / "checkpoint" / "README.md").read_text()
    assert not [k for k in json.loads((tmp_path / "metrics.jsonl").read_text()) if k.startswith("eval_")]


def test_train_wandb_without_a_login_stops_before_the_model_loads(tmp_path):
    # a process of its own: wandb keeps the settings of the first run in a process (the offline test's)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")  # no ~/.netrc holding a key
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "train.py"] + SMALL_ONE_STEP + ["--wandb_log=True", "--out_dir", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.match(r"--wandb_log=True, but wandb could not start: .*wandb login", run.stderr.strip().splitlines()[-1])
    assert "held-out" not in run.stdout  # stopped before the model loaded and evaluated
    train.main(SMALL_ONE_STEP + ["--out_dir", str(out)])  # nothing of the failed start is in the way
    assert _steps(out) == [1]


@pytest.mark.parametrize("end", ["finished", "signal", "skipped_updates", "bad_input", "failed_save", "error"])
def test_train_every_way_a_run_ends_goes_through_one_teardown(end, tmp_path, monkeypatch):
    import resource
    import signal
    import threading
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    args, raises, message = SMALL_ONE_STEP, None, None
    done, limits, xfsz = threading.Event(), resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    if end == "signal":  # a SIGTERM once step 1 is logged, as a scheduler sends it
        args, raises, message = SMALL + ["--max_steps=100", "--save_interval=100"], SystemExit, "stopped by SIGTERM"

        def send():
            while not done.is_set():
                if (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text():
                    return os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
        threading.Thread(target=send, daemon=True).start()
    elif end == "skipped_updates":  # lr 1e3: step 1 wrecks the weights, step 2's update is non-finite
        args, raises, message = (SMALL + ["--lr=1e3", "--entropy_coef=0.1", "--max_steps=6", "--max_skipped_updates=1"],
                                 SystemExit, "1 updates in a row skipped")
    elif end == "bad_input":  # found once out_dir is locked
        args, raises, message = SMALL_ONE_STEP + ["--resume=True"], SystemExit, "holds no complete checkpoint"
    elif end == "failed_save":  # files over 1 MB fail like a full disk
        raises, message = SystemExit, "cannot write the checkpoint"
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (both restored below, whatever happens)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    elif end == "error":  # a bug: not one of the run's own one-line stops
        def bug(*a, **k):
            raise RuntimeError("a bug in the training loop")
        monkeypatch.setattr(train, "step_metrics", bug)
        raises, message = RuntimeError, "a bug in the training loop"
    try:
        if raises is None:
            train.main(args + ["--out_dir", str(tmp_path)])
        else:
            with pytest.raises(raises, match=message):
                train.main(args + ["--out_dir", str(tmp_path)])
    finally:
        done.set()
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # the run's handlers are gone
    assert not (tmp_path / "LOCK").exists() and not (tmp_path / "checkpoint.tmp").exists()


TEARDOWN_SCRIPT = textwrap.dedent("""
    # train.main on each rank, then what its end left behind: the process group, the signal handlers, out_dir's LOCK
    import json, os, signal, sys, threading, time
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    import train
    out, args = sys.argv[1], sys.argv[2:]
    rank = int(os.environ["RANK"])
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    if "--max_steps=100" in args and rank == 1:  # a SIGTERM to rank 1 alone once step 1 is logged
        def send():
            metrics = os.path.join(out, "metrics.jsonl")
            while not (os.path.exists(metrics) and open(metrics).read()):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=send, daemon=True).start()
    try:
        train.main(args + ["--out_dir", out])
        end = "finished"
    except SystemExit as e:
        end = str(e)
    left = {{"rank": rank, "end": end, "process_group": dist.is_initialized(),
            "handlers": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers,
            "lock": os.path.exists(os.path.join(out, "LOCK"))}}
    with open(out + f".rank{{rank}}.json", "w") as f:  # a file each: two ranks' prints can share one stdout line
        json.dump(left, f)
    os._exit(0)
""")


def test_train_two_ranks_end_through_the_teardown_on_a_signal_and_on_skipped_updates(tmp_path):
    script = tmp_path / "ends.py"
    script.write_text(TEARDOWN_SCRIPT.format(root=ROOT))
    base = SMALL + ["--batch_size=4", "--eval_limit=1"]  # one held-out problem for two ranks: none to measure
    for end, args, message in [
            ("signal", ["--max_steps=100", "--save_interval=100"], "stopped by SIGTERM after step"),
            ("skipped", ["--lr=1e3", "--entropy_coef=0.1", "--max_steps=6", "--max_skipped_updates=1"],
             "1 updates in a row skipped")]:
        run = _torchrun([str(script), str(tmp_path / end)] + base + args)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        left = [json.loads((tmp_path / f"{end}.rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [r["rank"] for r in left] == [0, 1] and message in left[0]["end"] and left[1]["end"] == "1", left
        assert all(not r["process_group"] and r["handlers"] and not r["lock"] for r in left), left
        held_out = [line for line in run.stdout.splitlines() if line.startswith("held-out")]  # not nan
        assert held_out and all(line.endswith("not measured (no held-out problems)") for line in held_out), held_out


def test_train_two_ranks_save_a_tied_model_with_its_weight_once(tmp_path):
    # Qwen2.5-VL-3B ties its LM head to the embedding: FSDP2's gathered state dict holds both as separate tensors;
    # the checkpoint stores the weight once, and stock transformers loads it with the head tied again
    import safetensors
    policy, tok = model_lib.build_tiny(seed=0)
    policy.config.tie_word_embeddings = True
    tied = model_lib.Qwen2_5_VLForConditionalGeneration(policy.config)
    tied.save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    run = _torchrun(["train.py", *SMALL_ONE_STEP, "--model", str(tmp_path / "tied"), "--batch_size=2",
                     "--eval_limit=0", f"--out_dir={tmp_path / 'run'}"])
    assert run.returncode == 0, run.stderr[-3000:]
    with safetensors.safe_open(tmp_path / "run" / "checkpoint" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # (the hub's key names)
    loaded = model_lib.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "run" / "checkpoint")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()


def test_train_a_new_perturbation_is_one_function_and_one_entry(tmp_path, monkeypatch):
    # egas.PERTURBATIONS is the one place a perturbation is named: an entry added at runtime is accepted by the
    # config check, used for the second half of the rollouts, logged, saved and named in the model card
    def flip(policy, images, clean, step, cfg):
        return [x.flip(-1) for x in images], [], {"flipped": 1.0}
    monkeypatch.setitem(egas.PERTURBATIONS, "flip", ("SaEI's flip control", flip))
    seen = []
    real_sample = train.sample
    monkeypatch.setattr(train, "sample", lambda *a, **kw: seen.append(kw["images"]) or real_sample(*a, **kw))
    train.main(SMALL + ["--perturb=flip", "--max_steps=2", "--save_interval=1", "--eval_limit=0",
                        "--out_dir", str(tmp_path)])
    logs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [l["flipped"] for l in logs] == [1.0, 1.0] and all(l["attack_linf"] > 0 for l in logs)
    clean, adv = seen[0], seen[1]  # step 1's two sampling calls
    assert all(torch.equal(a, c.flip(-1)) for a, c in zip(adv, clean, strict=True))
    assert "SaEI's flip control" in (tmp_path / "checkpoint" / "README.md").read_text()
    with pytest.raises(SystemExit, match="perturb must be one of"):
        train.get_config(SMALL + ["--perturb=blur"])


def test_train_kl_cov_and_clip_cov_change_the_update_they_are_meant_to(tmp_path):
    # one warm-start step in 2 mini-batches: Clip-Cov cuts tokens from the first (on-policy) mini-batch on;
    # KL-Cov's |log ratio| is 0 on the first, so it acts from the second, where it also drops the clip. (Few of
    # this small batch's covariance terms reach Clip-Cov's default window (1, 5): the run widens it to (0, 100).)
    runs = {}
    for control in ("none", "clip_cov", "kl_cov"):
        out = tmp_path / control
        train.main(SMALL_ONE_STEP + WARM + ["--updates_per_rollout=2", "--lr=1e-3", "--eval_limit=0",
                                            f"--cov_control={control}", "--cov_ratio=0.05",
                                            "--clip_cov_bounds=(0.0, 100.0)", "--out_dir", str(out)])
        runs[control] = (json.loads(open(out / "metrics.jsonl").readline()), _weights(out))
    none_log, none_weights = runs["none"]
    assert "cov_frac" not in none_log
    for control in ("clip_cov", "kl_cov"):
        log, weights = runs[control]
        assert 0 < log["cov_frac"] <= 0.05 + 0.05  # ~5% of the tokens (at least one per micro-batch)
        assert log["reward_clean"] == none_log["reward_clean"]  # the same rollouts...
        assert max((weights[k] - none_weights[k]).abs().max().item() for k in weights) > 1e-6  # ...updated otherwise
    assert runs["kl_cov"][0]["clip_frac"] == 0.0


def test_train_random_sign_samples_the_second_half_on_an_image_moved_by_the_attacks_budget(tmp_path):
    step = _one_step(*_spied_run(tmp_path, "--perturb", "random_sign", "--pgd_alpha", repr(4 / 255),
                                 "--max_response_len", "8"))
    clean, adv = step["sample"]
    assert not step["attack"] and "attack_gain" not in step["log"]  # EgAS never runs
    assert step["log"]["attack_linf"] == pytest.approx(4.0, abs=1e-3)
    for a, c in zip(adv["args"]["images"], clean["args"]["images"], strict=True):
        moved = ((a - c) * 255).abs()
        assert torch.allclose(moved[(c > 4 / 255) & (c < 251 / 255)], torch.tensor(4.0), atol=1e-3)

def test_train_perturb_none_samples_the_second_half_on_the_clean_image(tmp_path):
    step = _one_step(*_spied_run(tmp_path, "--perturb", "none", "--max_response_len", "8"))
    clean, adv = step["sample"]
    assert not step["attack"] and not step["add_noise"] and "attack_gain" not in step["log"]
    assert adv["args"]["n"] == 2 and adv["args"]["prompts"] == clean["args"]["prompts"]
    assert all(torch.equal(a, c) for a, c in zip(adv["args"]["images"], clean["args"]["images"], strict=True))


# ----------------------------------------------------------------------------- distributed.py

def test_distributed_two_ranks_loss_and_gradients_equal_one_rank(tmp_path):
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
    # with bf16 compute weights (autocast off) the update and the attack run, and land near their fp32 values
    # (before the fix: "expected m1 and m2 to have the same dtype" in the LM head's backward)
    c = b["bf16"]
    assert c["grads"].keys() == a["grads"].keys() and all(g.dtype == torch.float32 for g in c["grads"].values())
    worst = max(((c["grads"][k] - a["grads"][k]).norm() / a["grads"][k].norm()).item() for k in a["grads"])
    assert worst < 0.05, worst  # bf16 rounding: ~1-2% per tensor here
    assert c["attack"]["objective_clean"] == pytest.approx(a["attack"]["objective_clean"], rel=1e-2)
    assert math.isfinite(c["attack"]["objective_adv"]) and c["attack"]["objective_adv"] != c["attack"]["objective_clean"]


LOAD_WAIT_SCRIPT = textwrap.dedent("""
    # 2 ranks whose collectives time out after 3 s, while rank 0 takes 8 s to read the weights (a first download)
    import datetime, os, sys, time, torch
    sys.path.insert(0, {root!r})
    import distributed
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
    rank = torch.distributed.get_rank()
    real = distributed.load_policy
    distributed.load_policy = lambda *a, **kw: (time.sleep(8), real(*a, **kw))[1]
    model, tok, weights = distributed.load_on_rank0("tiny", rank, 0)
    print("loaded", rank, weights is not None, flush=True)
    distributed.leave_process_group()
    os._exit(0)
""")


def test_distributed_ranks_wait_for_rank0s_load_past_the_collective_timeout(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(LOAD_WAIT_SCRIPT.format(root=ROOT))
    run = _torchrun([str(script)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded 0 True" in run.stdout and "loaded 1 False" in run.stdout


def test_distributed_expandable_segments_on_cuda_unless_the_user_chose():
    env = {}
    distributed.use_expandable_segments("cpu", env)
    assert env == {}
    distributed.use_expandable_segments("cuda:3", env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    distributed.use_expandable_segments("cuda", mine)
    assert mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}


# ----------------------------------------------------------------------------- checkpoint.py

def test_checkpoint_new_run_in_a_used_out_dir_refuses_unless_overwrite(demo_checkpoint, tmp_path):
    import shutil
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match="already holds a run .*--overwrite=True"):
        train.main(SMALL_ONE_STEP + ["--out_dir", str(out)])
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and not (out / "LOCK").exists()
    # --overwrite=True replaces the run; the base is a local folder whose image processor config is carried over
    base = tmp_path / "base"
    shutil.copytree(demo_checkpoint[0], base)
    processor = json.load(open(base / "preprocessor_config.json"))
    json.dump(dict(processor, note="the base's own"), open(base / "preprocessor_config.json", "w"))
    train.main(SMALL_ONE_STEP + ["--model", str(base), "--overwrite=True", "--out_dir", str(out)])
    assert _steps(out) == [1] and not (out / "LOCK").exists()
    carried = json.load(open(out / "checkpoint" / "preprocessor_config.json"))
    assert carried["note"] == "the base's own" and carried["size"] == {"shortest_edge": 3136, "longest_edge": 12544}
    assert f"base model: {base}" in (out / "checkpoint" / "README.md").read_text()


def test_checkpoint_out_dir_lock_keeps_a_second_run_out_and_takes_over_a_stale_one(tmp_path):
    import checkpoint
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        (tmp_path / "LOCK").write_text(f"{other.pid} {socket.gethostname()}")
        with pytest.raises(SystemExit, match=f"in use by another run \\(process {other.pid} on"):
            train.main(SMALL_ONE_STEP + ["--out_dir", str(tmp_path)])
    finally:
        other.kill()
        other.wait()
    assert (tmp_path / "LOCK").read_text().startswith(str(other.pid))  # not ours to remove while it ran
    checkpoint.lock(str(tmp_path))  # its process is gone: a stale lock, taken over
    assert (tmp_path / "LOCK").read_text().split()[0] == str(os.getpid())
    checkpoint.unlock()
    assert not (tmp_path / "LOCK").exists()


def test_checkpoint_resume_finds_the_newest_complete_checkpoint_in_every_state_a_kill_leaves(tmp_path):
    import checkpoint
    # what a kill can leave: checkpoint.tmp half-written or complete before its rename, checkpoint.old between the
    # two renames or half-deleted; complete = has trainer_state.pt (written last)
    cases = [({"checkpoint": 1}, "checkpoint", 1), ({"checkpoint": 1, "checkpoint.tmp": None}, "checkpoint", 1),
             ({"checkpoint": 1, "checkpoint.tmp": 2}, "checkpoint.tmp", 2),
             ({"checkpoint.old": 1, "checkpoint.tmp": 2}, "checkpoint.tmp", 2),
             ({"checkpoint.old": 1, "checkpoint": 2}, "checkpoint", 2),
             ({"checkpoint.old": None, "checkpoint": 2}, "checkpoint", 2),
             ({"checkpoint.old": 1, "checkpoint.tmp": None}, "checkpoint.old", 1),
             ({"checkpoint.tmp": None}, None, None)]
    for i, (folders, newest, step) in enumerate(cases):
        out = tmp_path / str(i)
        for name, saved_step in folders.items():
            (out / name).mkdir(parents=True)
            (out / name / "model.safetensors").write_text(name)
            if saved_step is not None:
                torch.save({"step": saved_step}, out / name / "trainer_state.pt")
        found = checkpoint.newest(str(out))
        assert found == (str(out / newest) if newest else None), folders
        if found:  # made the live checkpoint; nothing else left for a later save to trip over
            checkpoint.promote(str(out), found)
            assert sorted(os.listdir(out)) == ["checkpoint"]
            assert (out / "checkpoint" / "model.safetensors").read_text() == newest
            assert torch.load(out / "checkpoint" / "trainer_state.pt")["step"] == step


def test_checkpoint_resume_continues_the_same_run_or_stops_with_one_line(tmp_path):
    import resource
    import shutil
    import signal
    out = tmp_path / "run"
    args = SMALL + ["--max_steps=2", "--save_interval=1", "--out_dir", str(out)]
    with pytest.raises(SystemExit, match="--resume=True but .* holds no complete checkpoint"):
        train.main(args + ["--resume=True"])
    train.main(args)
    # killed between save's two renames (checkpoint.old = step 1, checkpoint.tmp = step 2) after logging step 3
    shutil.copytree(out / "checkpoint", out / "checkpoint.tmp")
    os.rename(out / "checkpoint", out / "checkpoint.old")
    state = torch.load(out / "checkpoint.old" / "trainer_state.pt", weights_only=False)
    torch.save(dict(state, step=1), out / "checkpoint.old" / "trainer_state.pt")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3}\n')
    # a changed value that changes the run stops before the model loads, naming it; nothing is touched
    for changed, name in [("--n_clean=3", "n_clean is 3 but the checkpoint was trained with 2"),
                          ("--freeze_vision=False", "freeze_vision is False"), ("--lr=0.001", "lr is 0.001")]:
        with pytest.raises(SystemExit, match=name):
            train.main(args + ["--resume=True", "--max_steps=3", changed])
    assert sorted(os.listdir(out)) == ["checkpoint.old", "checkpoint.tmp", "metrics.jsonl"]
    train.main(args + ["--resume=True", "--max_steps=3"])
    assert _steps(out) == [1, 2, 3]  # resumed at step 3 (not 1); the step-3 line of the killed run replaced
    assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl"]
    # a full disk at save time: one line, the previous checkpoint whole (files over 1 MB fail like a full disk)
    before = _weights(out)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(SystemExit, match="cannot write the checkpoint .*File too large.*checkpoint \\(step 3\\) is intact"):
            train.main(args + ["--resume=True", "--max_steps=4"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    after = _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl"]
    # an out_dir that cannot be written: one line before the model loads
    with pytest.raises(SystemExit, match="cannot create out_dir"):
        train.main(SMALL_ONE_STEP + ["--out_dir", str(out / "metrics.jsonl" / "sub")])


def test_checkpoint_consecutive_skipped_updates_stop_and_keep_the_last_checkpoint(tmp_path, capsys):
    # lr 1e3: step 1 wrecks the weights, the next updates are non-finite and skipped
    with pytest.raises(SystemExit, match=r"2 updates in a row skipped as non-finite \(steps 2-3\)"):
        train.main(SMALL + ["--lr=1e3", "--entropy_coef=0.1", "--max_steps=6", "--save_interval=1",
                            "--max_skipped_updates=2", "--out_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "warning: step 2: update skipped" in printed and "warning: step 3: update skipped" in printed
    assert _steps(tmp_path) == [1, 2, 3]
    assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 1
    assert not (tmp_path / "LOCK").exists()


def test_checkpoint_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    import signal
    import time
    # entropy_coef gives every step a gradient even when all rewards tie, so Adam's moments matter
    args = SMALL + ["--entropy_coef=0.05", "--lr=1e-3", "--save_interval=100", "--max_steps=4"]
    train.main(args + ["--out_dir", str(tmp_path / "straight")])
    # a real SIGTERM in the middle of the run: the step finishes, a checkpoint is written, the process exits
    # non-zero (so `train.py && eval.py` does not go on as if training had finished)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py"] + args + ["--max_steps=100", "--out_dir", str(tmp_path / "killed")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out[-3000:]
    assert "stopped by SIGTERM after step" in out.strip().splitlines()[-1]
    stopped_at = torch.load(tmp_path / "killed" / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 1 <= stopped_at < 4 and logged[-1] == stopped_at
    train.main(args + ["--resume=True", "--out_dir", str(tmp_path / "killed")])
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # no step repeated or skipped
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_checkpoint_torchrun_two_ranks_saves_sharded_and_resumes_exactly(tmp_path):
    import signal
    import socket
    # entropy_coef gives every step a gradient even when all rewards tie, so Adam's moments matter
    args = ["train.py"] + SMALL + ["--batch_size=4", "--entropy_coef=0.05", "--lr=1e-3", "--save_interval=100"]
    run = _torchrun(args + ["--max_steps=3", "--out_dir", str(tmp_path / "straight")])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [1, 2, 3]  # rank 0 alone writes the log
    assert all("attack_gain" in l and l["response_len"] > 0 for l in logs)
    from model import load_policy
    policy, _ = load_policy(str(tmp_path / "straight" / "checkpoint"))
    assert sum(p.numel() for p in policy.parameters()) > 1e6  # the whole model, gathered from both shards
    # SIGTERM to rank 1 alone: both ranks stop after the step, save, exit non-zero; rank 0 names the signal
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}"] + args + ["--max_steps=100", "--out_dir", str(tmp_path / "killed")],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    os.kill(_worker_pid(port, 1), signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0 and re.search(r"stopped by SIGTERM after step \d; checkpoint saved", out), out[-3000:]
    killed = tmp_path / "killed" / "checkpoint"
    stopped_at = torch.load(killed / "trainer_state.pt", weights_only=False)["step"]
    assert 1 <= stopped_at < 3
    # the optimizer state is written shard by shard: each rank wrote about half of it, neither the whole
    shards = sorted(glob.glob(str(killed / "optimizer" / "*.distcp")))
    sizes = [os.path.getsize(f) for f in shards]
    assert len(shards) == 2 and all(0.4 < size / sum(sizes) < 0.6 for size in sizes), sizes
    # resuming on another number of ranks stops with one line, before the model loads
    with pytest.raises(SystemExit, match=r"trained on 2 rank\(s\), this run has 1"):
        train.main(args[1:] + ["--resume=True", "--max_steps=3", "--out_dir", str(tmp_path / "killed")])
    # a rank that cannot see the checkpoint rank 0 resumes from: every rank stops with one line
    script = tmp_path / "see.py"
    script.write_text(SEE_SCRIPT.format(root=ROOT))
    (tmp_path / "elsewhere").mkdir()
    see = _torchrun([str(script), str(tmp_path / "killed"), str(tmp_path / "elsewhere")])
    for rank in (0, 1):
        assert f"rank {rank}: resume: rank(s) 1 cannot see" in see.stdout, (see.stdout + see.stderr)[-3000:]
    # both ranks resume (each reads its own optimizer shards) and end where the uninterrupted run ended
    run = _torchrun(args + ["--resume=True", "--max_steps=3", "--out_dir", str(tmp_path / "killed")])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_checkpoint_is_a_model_folder_transformers_alone_can_use(demo_checkpoint, geo3k):
    import eval as evaluation
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration
    path, end = demo_checkpoint
    # the image processor in the folder resizes and normalizes a real Geometry3K diagram (RGBA) exactly as we do
    processor = AutoImageProcessor.from_pretrained(path)
    image = geo3k[0]["images"][0]
    x = data.load_image(image, 12544, 12544)
    ours, grid = data.image_to_pixels(x)
    theirs = processor(images=[image], return_tensors="pt")
    assert theirs["pixel_values"].shape == ours.shape and (theirs["pixel_values"] - ours).abs().max().item() == 0.0
    assert theirs["image_grid_thw"].tolist() == grid.tolist()
    assert theirs["image_grid_thw"].prod().item() // 4 == data.n_image_tokens(x) == 12
    # transformers alone (tokenizer + chat template, image processor, model, generation config) gives eval.py's
    # greedy answer to a held-out problem
    trained = json.load(open(path / "training_config.json"))
    problem = data.synthetic_split("test")[0]
    tok = AutoTokenizer.from_pretrained(path)
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    assert not GenerationConfig.from_pretrained(path).do_sample
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem["problem"].replace(
        "<image>", "") + trained["instruction"]}]}]
    inputs = processor(images=[problem["images"][0]], return_tensors="pt")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (inputs["image_grid_thw"].prod().item() // 4))
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    mm_types = (ids.input_ids == policy.config.image_token_id).int()
    out = policy.generate(**ids, **inputs, mm_token_type_ids=mm_types)  # the folder's generation config
    answer = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    ours = evaluation.evaluate(policy, tok, [problem], 12544, 12544, 96)["samples"][0]["response"]
    assert answer == ours and "\\boxed" in answer
    # the model card says what the folder is
    card = (path / "README.md").read_text()
    assert "tiny-synthetic" in card and "SaEI" in card and "steps: 1 of 1" in card
    assert f"{100 * end['accuracy']:.1f}%" in card and "16 problems of synthetic/test" in card


def test_checkpoint_a_last_update_skipped_is_a_non_zero_exit_not_a_finished_run(tmp_path):
    # lr 1e3: step 1 wrecks the weights, the updates of steps 2 and 3 (the last) are skipped; no save_interval step
    with pytest.raises(SystemExit, match=r"update of the last step \(3\) was skipped as non-finite \(2 in a row\), so "
                                         r"the final weights were not saved; there is no checkpoint"):
        train.main(SMALL + ["--lr=1e3", "--entropy_coef=0.1", "--max_steps=3", "--out_dir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_checkpoint_overwrite_deletes_the_old_run_only_once_the_new_one_has_started(one_saved_step, tmp_path):
    out = _copy(one_saved_step, tmp_path / "run")
    before, logged = _weights(out), (out / "metrics.jsonl").read_text()
    # a typo in the model, a dataset with no usable row: found after out_dir is locked, before the new run starts
    for args, message in [(["--model=Qwen2.5-VL-3b"], "unknown model 'Qwen2.5-VL-3b'"),
                          (["--max_prompt_len=10"], "no usable row")]:
        with pytest.raises(SystemExit, match=message):
            train.main(SMALL_ONE_STEP + args + ["--overwrite=True", "--out_dir", str(out)])
        after = _weights(out)
        assert all(torch.equal(before[k], after[k]) for k in before) and (out / "metrics.jsonl").read_text() == logged
        assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl"]


def test_checkpoint_a_failed_optimizer_write_leaves_no_partial_folder(one_saved_step, tmp_path):
    import resource
    import signal
    # files over 6 MB fail like a full disk: the model (5 MB) is written, the optimizer state (8 MB) is not, and
    # torch.distributed.checkpoint's error is a BaseException (not caught by `except Exception`)
    fresh, resumed = tmp_path / "fresh", _copy(one_saved_step, tmp_path / "resumed")
    before = _weights(resumed)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, limits[1]))
    try:
        with pytest.raises(SystemExit, match=r"cannot write the checkpoint .*: File too large; no checkpoint kept$"):
            train.main(SMALL_ONE_STEP + ["--out_dir", str(fresh)])
        with pytest.raises(SystemExit, match=r": File too large; the previous checkpoint .* \(step 1\) is intact$"):
            train.main(SMALL + ["--max_steps=2", "--resume=True", "--out_dir", str(resumed)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(os.listdir(fresh)) == ["metrics.jsonl"]
    assert sorted(os.listdir(resumed)) == ["checkpoint", "metrics.jsonl"]
    after = _weights(resumed)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_resume_mends_a_torn_metrics_line_and_takes_new_memory_settings(one_saved_step, tmp_path, capsys):
    out = _copy(one_saved_step, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "reward_clean": 0.')  # a kill (or a full disk) mid-line
    capsys.readouterr()
    memory = ["--micro_batch_size=1", "--gradient_checkpointing=False", "--rollout_chunk=3", "--attack_rows=2"]
    train.main(SMALL + ["--max_steps=2", "--resume=True", "--out_dir", str(out)] + memory)
    assert _steps(out) == [1, 2]
    printed = capsys.readouterr().out
    assert "dropped 1 line(s)" in printed and f"resuming {out / 'checkpoint'} at step 1 of 2" in printed
    assert "held-out greedy accuracy at step 1, where this run resumes: " in printed
    assert "before training" not in printed


def test_checkpoint_a_full_disk_while_logging_is_one_line_and_leaves_no_torn_line(tmp_path):
    import resource
    import signal

    def small_files():  # in the child: files over 300 bytes fail like a full disk (a metrics line is ~900)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out = tmp_path / "run"
    args = ["--model", "tiny", "--dataset", "synthetic", "--min_pixels=12544", "--max_pixels=12544",
            "--max_response_len=24", "--batch_size=2", "--n_clean=2", "--n_adv=2", "--eval_limit=2",
            "--updates_per_rollout=1", "--max_steps=2", "--out_dir", str(out)]
    run = subprocess.run([sys.executable, "train.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         preexec_fn=small_files, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1"))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.fullmatch(r"cannot write step 1 to .*metrics.jsonl: File too large; there is no checkpoint; free some "
                        r"space, then start again with --overwrite=True", run.stderr.strip().splitlines()[-1])
    assert (out / "metrics.jsonl").read_text() == "" and sorted(os.listdir(out)) == ["metrics.jsonl"]


def test_checkpoint_a_run_that_died_before_its_first_checkpoint_gets_advice_that_works(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as new:
        train.main(SMALL_ONE_STEP + ["--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as resumed:
        train.main(SMALL_ONE_STEP + ["--resume=True", "--out_dir", str(tmp_path)])
    assert "--overwrite=True" in str(new.value) and "--resume" not in str(new.value)
    assert "--overwrite=True" in str(resumed.value) and "drop --resume" not in str(resumed.value)
    train.main(SMALL_ONE_STEP + ["--overwrite=True", "--out_dir", str(tmp_path)])
    assert _steps(tmp_path) == [1]


class _Crafted:
    """What a crafted pickle can do when it is loaded: run a shell command (here, create a file)."""
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {self.mark}",)


def test_checkpoint_resume_runs_no_code_from_the_checkpoint_folder(one_saved_step, tmp_path):
    import pickle
    out, ran = _copy(one_saved_step, tmp_path / "run"), tmp_path / "ran"
    marker = out / "checkpoint" / "trainer_state.pt"
    state = torch.load(marker, weights_only=True)
    torch.save(dict(state, step=_Crafted(ran)), marker)
    with pytest.raises(SystemExit, match="holds no complete checkpoint"):
        train.main(SMALL + ["--max_steps=2", "--resume=True", "--out_dir", str(out)])
    assert not ran.exists()
    torch.save(state, marker)
    (out / "checkpoint" / "optimizer" / ".metadata").write_bytes(pickle.dumps(_Crafted(ran)))
    with pytest.raises(SystemExit, match=r"is damaged \(optimizer/.metadata is unreadable: it names .*system"):
        train.main(SMALL + ["--max_steps=2", "--resume=True", "--out_dir", str(out)])
    assert not ran.exists()


def test_checkpoint_a_damaged_checkpoint_stops_resume_with_one_line(one_saved_step, tmp_path, monkeypatch):
    out = _copy(one_saved_step, tmp_path / "run")
    ckpt = out / "checkpoint"
    args = SMALL + ["--max_steps=2", "--resume=True", "--out_dir", str(out)]
    shard, metadata = ckpt / "optimizer" / "__0_0.distcp", ckpt / "optimizer" / ".metadata"
    config = ckpt / "training_config.json"
    kept = {f: f.read_bytes() for f in (shard, metadata, config)}

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the checkpoint was checked")
    with monkeypatch.context() as m:
        m.setattr(train, "load_policy", no_load)
        for damage, message in [(shard.unlink, r"optimizer/__0_0.distcp is missing"),
                                (metadata.unlink, r"optimizer/.metadata: No such file"),
                                (lambda: config.write_text("{"), r"training_config.json is damaged \(not JSON"),
                                (lambda: config.write_text('{"config": {}}'), "with the run's config and world_size")]:
            damage()
            with pytest.raises(SystemExit, match=message) as e:
                train.main(args)
            assert "\n" not in str(e.value) and not (out / "LOCK").exists()
            for f, content in kept.items():
                f.write_bytes(content)
    shard.write_bytes(kept[shard][:1000])  # cut short: every file is there, reading it fails
    with pytest.raises(SystemExit, match="resume: cannot read the optimizer state in "):
        train.main(args)


def test_checkpoint_resume_is_exact_with_sampled_evaluations(tmp_path, capsys):
    # with eval_samples every evaluation samples, and a resumed run also evaluates where it resumes: the training
    # stream must not see those draws
    args = SMALL + ["--entropy_coef=0.05", "--lr=1e-3", "--eval_samples=2", "--save_interval=1"]
    train.main(args + ["--max_steps=2", "--out_dir", str(tmp_path / "straight")])
    # the starting point's pass@k is printed (no metrics line holds it)
    printed = capsys.readouterr().out
    assert re.search(r"before training: [\d.]+ \(format [\d.]+, pass@1 [\d.]+, pass@2 [\d.]+\)", printed)
    train.main(args + ["--max_steps=1", "--out_dir", str(tmp_path / "resumed")])
    train.main(args + ["--max_steps=2", "--resume=True", "--out_dir", str(tmp_path / "resumed")])
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    def last(run):  # the step-2 line, timings aside
        line = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])
        return {k: v for k, v in line.items() if not k.startswith("t_")}
    assert last("straight") == last("resumed") and "eval_pass@2" in last("straight")


# ----------------------------------------------------------------------------- eval.py

def test_eval_bare_checkpoint_is_measured_as_train_measured_it(demo_checkpoint, tmp_path, capsys):
    import eval as evaluation
    path, end = demo_checkpoint
    (row,) = evaluation.main(["--model", str(path), "--out_dir", str(tmp_path)])
    assert 0 < end["accuracy"] < 1 and row["accuracy"] == end["accuracy"] and row["problems"] == 16
    printed = capsys.readouterr().out
    assert "min_pixels=12544 max_pixels=12544 max_response_len=96" in printed and "limit=16" in printed
    (row,) = evaluation.main(["--model", str(path), "--out_dir", str(tmp_path), "--limit=4"])
    assert row["problems"] == 4 and "from the command line: limit=4" in capsys.readouterr().out

def test_eval_benchmark_scores_hand_computed():
    # HallusionBench: two figures of one set, each asked the same two questions. Figure 0 all right; figure 1 wrong
    # on question 1. aAcc 3/4; fAcc 1/2 (figure 0); qAcc 1/2 (question 0 is right on both figures)
    def hallu(figure, question, correct):
        return {"correct": correct, "meta": {"category": "VS", "subcategory": "chart", "set_id": "3",
                                             "figure_id": str(figure), "question_id": str(question)}}
    samples = [hallu(0, 0, True), hallu(0, 1, True), hallu(1, 0, True), hallu(1, 1, False)]
    assert evaluation.benchmark_scores("hallusionbench", samples) == {"aAcc": 0.75, "fAcc": 0.5, "qAcc": 0.5}
    verse = [{"correct": c, "meta": {"problem_version": v}} for c, v in
             [(True, "Vision Only"), (False, "Vision Only"), (True, "Text Lite"), (True, "Text Lite"), (False, "Text Lite")]]
    assert evaluation.benchmark_scores("mathverse", verse) == pytest.approx(
        {"accuracy Text Lite": 2 / 3, "accuracy Vision Only": 0.5})
    assert evaluation.benchmark_scores("geometry3k", verse) == {}


def test_eval_uses_the_instruction_role_the_checkpoint_was_trained_with(tmp_path, capsys):
    train.main(SMALL_ONE_STEP + ["--instruction_role=system", "--eval_limit=0", "--out_dir", str(tmp_path)])
    cfg = evaluation.settings(["--model", str(tmp_path / "checkpoint")])
    assert cfg.instruction_role == "system" and "instruction_role=system" in capsys.readouterr().out
    assert evaluation.settings(["--model", str(tmp_path / "checkpoint"), "--instruction_role=user"]).instruction_role == "user"


def test_eval_device_map_auto_spreads_a_checkpoint_and_answers_alike(demo_checkpoint, tmp_path):
    # transformers' device_map="auto" (through accelerate) is how a checkpoint too big for one GPU is evaluated;
    # on CPU it places every layer on the CPU, and the answers are the plain load's
    path, _ = demo_checkpoint
    (plain,) = evaluation.main(["--model", str(path), "--out_dir", str(tmp_path / "plain"), "--limit=4"])
    (spread,) = evaluation.main(["--model", str(path), "--out_dir", str(tmp_path / "auto"), "--limit=4",
                                 "--device_map=auto"])
    assert spread == plain
    samples = lambda d: [json.loads(line)["response"] for line in open(tmp_path / d / "samples.jsonl")]
    assert samples("auto") == samples("plain")


def test_eval_answer_styles(copies):
    def graded(spec, i, answer_text):
        r = data.load_records(spec, "test")[i]
        return rewards.score(_box(answer_text), r["answer"], r["choices"])["accuracy"] == 1.0

    geo = f"geometry3k={GEO3K_SAMPLE}"
    assert graded(geo, 3, "5\\sqrt{3}") and graded(geo, 5, "\\frac{2\\sqrt{2}}{5}") and graded(geo, 0, "80^\\circ")
    assert not graded(geo, 3, "C")  # free-form: a bare letter is not an answer
    mmk12 = f"mmk12={copies['mmk12']}"
    assert graded(mmk12, 1, "2.5") and graded(mmk12, 1, "\\frac{5}{2}") and graded(mmk12, 0, "-2")
    vista = f"mathvista={copies['mathvista']}"
    assert graded(vista, 0, "B") and graded(vista, 0, "(B)") and graded(vista, 0, "45°")  # letter or option text
    assert not graded(vista, 0, "A") and not graded(vista, 0, "30°")
    assert graded(vista, 1, "1.5") and not graded(vista, 1, "15")
    verse = f"mathverse={copies['mathverse']}"
    assert graded(verse, 0, "D") and graded(verse, 0, "140°") and not graded(verse, 0, "C")
    assert graded(verse, 2, "D") and graded(verse, 1, "10")
    vision = f"mathvision={copies['mathvision']}"
    assert graded(vision, 0, "C") and graded(vision, 0, "3") and not graded(vision, 0, "D")
    assert graded(vision, 1, "7") and not graded(vision, 1, "8")
    hallu = f"hallusionbench={copies['hallusionbench']}"
    assert graded(hallu, 0, "Yes") and graded(hallu, 0, "yes.") and not graded(hallu, 0, "no")
    assert graded(hallu, 1, "No") and not graded(hallu, 1, "Yes")


def test_eval_writes_table_and_samples(copies, tmp_path, capsys):
    import eval as evaluation
    out = tmp_path / "eval"
    benchmarks = f"geo3k={GEO3K_SAMPLE},hallusionbench={copies['hallusionbench']}"
    rows = evaluation.main(["--model", "tiny", "--benchmarks", benchmarks, "--limit", "2", "--batch_size", "2",
                            "--max_response_len", "6",
                            "--min_pixels", str(28 * 28 * 4), "--max_pixels", str(28 * 28 * 16), "--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert [r["benchmark"] for r in rows] == ["geo3k", "hallusionbench"]
    assert all(r["problems"] == 2 and r["dropped"] == 0 for r in rows)
    assert "geo3k" in printed and "hallusionbench" in printed and "average" in printed
    results = json.load(open(out / "results.json"))
    assert results["model"] == "tiny" and len(results["benchmarks"]) == 2
    assert results["grading"] == "rule-based (mathruler), no LLM judge" and "no LLM judge" in printed
    hallu = [s["correct"] for s in map(json.loads, open(out / "samples.jsonl")) if s["benchmark"] == "hallusionbench"]
    assert results["scores"]["geo3k"] == {} and results["scores"]["hallusionbench"]["aAcc"] == sum(hallu) / 2
    assert results["average"] == pytest.approx(sum(r["accuracy"] for r in rows) / 2)
    table = list(csv.DictReader(open(out / "results.csv")))
    assert [t["benchmark"] for t in table] == ["geo3k", "hallusionbench", "average"]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 4 and [s["benchmark"] for s in samples] == ["geo3k"] * 2 + ["hallusionbench"] * 2
    for s in samples:
        assert {"question", "response", "extracted", "correct", "answer"} <= set(s)
        assert s["correct"] == (rewards.score(s["response"], s["answer"], s["choices"])["accuracy"] == 1.0)
    assert samples[2]["answer"] == "yes" and samples[0]["question"].startswith("<image>")


def test_eval_drops_long_prompts_and_counts(tmp_path):
    import eval as evaluation
    args = ["--model", "tiny", "--benchmarks", f"geo3k={GEO3K_SAMPLE}", "--max_response_len", "4",
            "--min_pixels", str(28 * 28 * 4), "--max_pixels", str(28 * 28 * 16), "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"geo3k: no usable row \(6 prompt over 100 tokens\)"):
        evaluation.main(args + ["--max_prompt_len", "100"])  # every prompt is over 100 tokens
    rows = evaluation.main(args + ["--max_prompt_len", "400", "--limit", "2"])
    assert rows[0]["problems"] + rows[0]["dropped"] == 2


def test_eval_in_chunks_gives_the_answers_of_one_call(tiny, geo3k):
    import eval as evaluation
    policy, tok = tiny
    records = [geo3k[i] for i in range(4)]
    one = evaluation.evaluate(policy, tok, records, 3136, 12544, 12, batch_size=4)
    chunked = evaluation.evaluate(policy, tok, records, 3136, 12544, 12, batch_size=4, chunk_rows=3)
    assert [s["response"] for s in one["samples"]] == [s["response"] for s in chunked["samples"]]
    assert len({s["response"] for s in one["samples"]}) > 1  # four different answers, not one repeated


def test_eval_pass_at_k_equals_enumerating_every_k_subset():
    import itertools
    import eval as evaluation
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert evaluation.ks_for(12) == [1, 2, 4, 8, 12] and evaluation.ks_for(4) == [1, 2, 4] and evaluation.ks_for(0) == []


def test_eval_n_samples_reports_pass_at_k_everywhere(tmp_path, capsys):
    import eval as evaluation
    out = tmp_path / "eval"
    rows = evaluation.main(["--model", "assets/tiny-synthetic", "--benchmarks", "synthetic", "--limit", "6",
                            "--n_samples", "4", "--max_response_len", "96", "--min_pixels", str(112 * 112),
                            "--max_pixels", str(112 * 112), "--out_dir", str(out)])
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 6 and all(len(s["sampled"]) == 4 for s in samples)
    # the table's numbers are the estimator over the per-problem counts written to samples.jsonl
    for k in (1, 2, 4):
        expected = sum(evaluation.pass_at_k(4, s["sampled_correct"], k) for s in samples) / 6
        assert rows[0][f"pass@{k}"] == pytest.approx(expected)
    assert rows[0]["pass@1"] == pytest.approx(sum(s["sampled_correct"] for s in samples) / 24)
    assert rows[0]["pass@1"] <= rows[0]["pass@2"] <= rows[0]["pass@4"]
    assert 0 < rows[0]["pass@4"]  # the warm start solves some of them
    table = list(csv.DictReader(open(out / "results.csv")))
    assert float(table[0]["pass@4"]) == pytest.approx(rows[0]["pass@4"])
    assert json.load(open(out / "results.json"))["benchmarks"][0]["pass@2"] == pytest.approx(rows[0]["pass@2"])
    assert "pass@4" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--benchmarks=synthetic,foo"], "unknown dataset 'foo'"),
    (["--benchmarks=synthetic,mathvista=/no/such/copy"], "dataset path '/no/such/copy' does not exist"),
    (["--benchmarks=synthetic,mathvistaa=/tmp"], "unknown dataset 'mathvistaa'"),
    (["--limit=-1"], "limit must be >= 0, got -1"),
    (["--n_samples=-2"], "n_samples must be >= 0, got -2"),
    (["--max_pixels=100", "--min_pixels=200"], "max_pixels .100. must be >= min_pixels"),
    (["--temperature=1e999"], "temperature must be finite"),
    (["--device=cuda:99"], "device 'cuda:99' is not available"),
])
def test_eval_bad_arguments_stop_before_the_model_loads(args, message, tmp_path, monkeypatch):
    import eval as evaluation

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(model_lib, "load_policy", no_load)
    with pytest.raises(SystemExit, match=message):
        evaluation.main(["--model", "tiny", "--out_dir", str(tmp_path)] + args)
    assert not os.path.exists(tmp_path / "results.json")


def test_eval_reads_every_benchmark_first_and_keeps_the_results_of_those_it_finished(tmp_path, monkeypatch):
    import eval as evaluation
    k12 = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string")}
    _table([{"images": [_image("red")], "problem": "<image>How many?", "answer": " "}], k12).to_parquet(
        str(tmp_path / "unanswered.parquet"))
    (tmp_path / "zero.parquet").write_bytes(b"")  # not a parquet file
    args = ["--model", "tiny", "--limit", "2", "--max_response_len", "4", "--min_pixels", "12544",
            "--max_pixels", "12544", "--out_dir", str(tmp_path / "eval")]

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before every benchmark was read")
    with monkeypatch.context() as m:
        m.setattr(model_lib, "load_policy", no_load)
        with pytest.raises(SystemExit, match="cannot read dataset .*zero.parquet"):
            evaluation.main(args + ["--benchmarks", f"synthetic,mmk12={tmp_path / 'zero.parquet'}"])
    with pytest.raises(SystemExit, match=r"no usable row \(1 empty answer\)"):
        evaluation.main(args + ["--benchmarks", f"synthetic,{tmp_path / 'unanswered.parquet'}"])
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert [(r["benchmark"], r["problems"]) for r in results["benchmarks"]] == [("synthetic", 2)]
    assert [t["benchmark"] for t in csv.DictReader(open(tmp_path / "eval" / "results.csv"))] == ["synthetic", "average"]


def test_eval_a_bad_first_row_is_counted_not_fatal(tmp_path):
    import eval as evaluation
    (row,) = evaluation.main(["--model", "tiny", "--benchmarks", _bad_first_rows(tmp_path)["undecodable"], "--limit",
                              "2", "--max_response_len", "4", "--min_pixels", "3136", "--max_pixels", "12544",
                              "--out_dir", str(tmp_path / "eval")])
    assert row["problems"] == 1 and row["dropped"] == 1


def test_eval_a_damaged_or_older_training_config(one_saved_step, tmp_path, capsys):
    import eval as evaluation
    ckpt = _copy(one_saved_step / "checkpoint", tmp_path / "checkpoint")
    trained = json.load(open(ckpt / "training_config.json"))
    del trained["config"]["max_prompt_len"], trained["instruction"]  # what an older train.py did not write
    json.dump(trained, open(ckpt / "training_config.json", "w"))
    (row,) = evaluation.main(["--model", str(ckpt), "--limit=1", "--out_dir", str(tmp_path / "eval")])
    assert row["problems"] == 1 and "not in it, eval.py's own: max_prompt_len=2048" in capsys.readouterr().out
    (ckpt / "training_config.json").write_text("{")
    with pytest.raises(SystemExit, match=r"training_config.json is damaged \(not JSON") as e:
        evaluation.main(["--model", str(ckpt), "--out_dir", str(tmp_path / "eval")])
    assert "\n" not in str(e.value)


def test_eval_paired_comparison_of_two_sample_files_hand_computed(tmp_path, capsys, monkeypatch):
    # results/collapse/paired.py reads two eval.py samples.jsonl files. Two problems, 2 samples each: before, 2 and
    # 1 right; after, 0 and 2. pass@1 0.75 -> 0.5 (per problem -1, +0.5: mean -0.25, sd 1.061, half-width
    # t(df=1) 12.706 * 1.061 / sqrt(2) = 9.529); pass@2 1 -> 0.5; problem 0 lost; distinct answers 1.5 -> 1.0
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(data.__file__), "results", "collapse"))
    import paired
    def write(name, rows):
        with open(tmp_path / name, "w") as f:
            for (answer, sampled) in rows:
                correct = sum(x == answer for x in sampled)
                row = {"question": "q", "answer": answer, "sampled": sampled, "sampled_correct": correct}
                f.write(json.dumps(row) + "\n")
    write("before.jsonl", [("3", ["3", "3"]), ("4", ["3", "4"])])
    write("after.jsonl", [("3", ["5", None]), ("4", ["4", "4"])])
    paired.main(tmp_path / "before.jsonl", tmp_path / "after.jsonl")
    printed = capsys.readouterr().out
    assert "pass@1: 0.750 -> 0.500, difference -0.250 [-9.779, +9.279]" in printed
    assert "pass@2: 1.000 -> 0.500, difference -0.500" in printed
    assert "1 lost, 0 gained, of 2" in printed and "distinct answers per problem in 2 samples: 1.50 -> 1.00" in printed
    write("other.jsonl", [("4", ["4", "4"]), ("3", ["3", "3"])])
    with pytest.raises(SystemExit, match="not hold the same problems"):
        paired.main(tmp_path / "before.jsonl", tmp_path / "other.jsonl")


# ----------------------------------------------------------------------------- compare.py

def test_compare_method_names_become_train_arguments():
    """saei_a<N>[_<band>] reaches train.py as pgd_alpha = N/255 (budget N/255 at T = 1) and that TsEC band."""
    import compare
    import train
    cfg = train.get_config(["config/demo.py", *compare.overrides("saei_a8_top")])
    assert (cfg.pgd_alpha, cfg.pgd_eps, cfg.tsec_band, cfg.n_adv, cfg.perturb) == (8 / 255, 8 / 255, (2 / 3, 1.0), 6, "egas")
    assert train.get_config(["config/demo.py", *compare.overrides("saei_a32")]).tsec_band == train.DEFAULTS["tsec_band"]
    assert train.get_config(["config/demo.py", *compare.overrides("grpo")]).n_clean == 12
    assert (compare.alpha_of("saei_a32"), compare.alpha_of("saei_a32_middle"), compare.alpha_of("saei_a32_all"),
            compare.alpha_of("grpo")) == (32, 32, None, None)
    with pytest.raises(SystemExit, match="unknown method 'saei_a8_upper'"):
        compare.overrides("saei_a8_upper")
    # the off-policy study's arms: the corrected ratio, the adversarial image in the update, a negative step
    cfg = train.get_config(["config/demo.py", *compare.overrides("saei_a32_behaviour")])
    assert (cfg.adv_old_logprob, cfg.logprob_image, cfg.pgd_alpha) == ("behaviour", "clean", 32 / 255)
    cfg = train.get_config(["config/demo.py", *compare.overrides("saei_a-32_advimage")])
    assert (cfg.adv_old_logprob, cfg.logprob_image, cfg.pgd_alpha, cfg.pgd_eps) == ("clean", "adversarial", -32 / 255,
                                                                                  32 / 255)
    assert compare.alpha_of("saei_a32_behaviour") is None  # not a point of the strength plot


def test_compare_every_study_config_names_runnable_methods():
    """A typo in a study file would surface only after hours of the study's other runs."""
    import compare
    import configurator
    import train
    studies = sorted(glob.glob("config/study_*.py"))
    assert len(studies) >= 3
    for path in studies:
        cfg = configurator.get_config(compare.DEFAULTS, [path])
        for method, _ in compare.method_seeds(cfg):
            train.get_config([cfg.train_config, *compare.overrides(method), *cfg.train_args.split()])  # train.py
            # accepts every argument


def test_compare_tables_from_finished_runs(tmp_path):
    import compare
    # three finished seeds of two methods, as train.py and eval.py leave them: compare.py reuses them
    finals = {"grpo": [0.5, 0.7, 0.6], "saei_a8": [0.6, 0.7, 0.8]}
    for method, accs in finals.items():
        for seed, final in enumerate(accs):
            path = tmp_path / "runs" / method / f"2steps-seed{seed}"
            (path / "pass_k").mkdir(parents=True)
            # as a run resumed once leaves it: two starts, the second one's accuracy at the checkpoint it resumed
            (path / "train.log").write_text(f"held-out greedy accuracy before training: 0.300 (format ...)\n"
                                            f"held-out greedy accuracy before training: 0.350 (format ...)\n"
                                            f"held-out greedy accuracy: 0.350 before -> {final:.3f} after (format ...)\n")
            (path / "pass_k" / "results.json").write_text(json.dumps(
                {"benchmarks": [{"benchmark": "synthetic", "accuracy": final, "pass@1": final / 2, "pass@12": 0.9}]}))
            logs = [{"step": s, "entropy_clean": 1.0 + seed + s, "answer_diversity": 2.0, "answer_diversity_clean": 1.0,
                     "accuracy_clean": 0.5} for s in (1, 2)]
            if method != "grpo":
                for l in logs:
                    l.update(entropy_adv=2.0 + seed + l["step"] + 0.1 * seed, attack_gain=0.01, answer_diversity_adv=3.0,
                             accuracy_adv=0.5)
            (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in logs))
    compare.main([f"--runs_dir={tmp_path / 'runs'}", f"--out_dir={tmp_path / 'study'}", f"--figures_dir={tmp_path}",
                  "--methods=grpo,saei_a8", "--seeds=3", "--steps=2", "--smooth=2"])
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "study" / "results.csv"))}
    assert float(rows["grpo"]["final_accuracy"]) == pytest.approx(0.6)
    assert float(rows["grpo"]["final_accuracy_std"]) == pytest.approx(0.1)  # sample std of 0.5, 0.7, 0.6
    assert float(rows["saei_a8"]["pass@1"]) == pytest.approx(0.35)
    assert float(rows["saei_a8"]["entropy_clean"]) == pytest.approx(3.5)  # mean over steps (2.5 + s), then seeds
    assert rows["grpo"]["attack_gain"] == "" and float(rows["saei_a8"]["attack_gain"]) == pytest.approx(0.01)
    runs = list(csv.DictReader(open(tmp_path / "study" / "runs.csv")))
    assert [(r["method"], r["seed"], float(r["final_accuracy"])) for r in runs][:2] == [("grpo", "0", 0.5), ("grpo", "1", 0.7)]
    assert {float(r["start_accuracy"]) for r in runs} == {0.3}  # step 0's, not the resumed run's
    md = (tmp_path / "study" / "results.md").read_text()
    assert "| saei_a8 | 3 | 0.700 ± 0.100 | 0.350 ± 0.050 | 0.900 ± 0.000 |" in md
    # paired differences 0.1, 0.0, 0.2: mean 0.1, sd 0.1, t(0.975, 2) = 4.303 -> half width 0.248
    assert "| saei_a8 | +0.100 [-0.148, +0.348]: no difference measured |" in md
    # the two halves, the seed as the unit: adversarial minus clean entropy, each seed's mean over its steps 1.0,
    # 1.1, 1.2 -> mean 1.1, sd 0.1, t(0.975, 2) = 4.303 -> half width 0.248 (the 6 steps as units would claim +-0.094)
    assert ("| saei_a8 | 3 | +1.100 [+0.852, +1.348]: higher (+1.000, +1.100, +1.200) | +0.000 [+0.000, +0.000]: "
            "no difference measured (+0.000, +0.000, +0.000) |") in md
    # GRPO's clean entropy 1 + seed + step; a 2-step run's windows are its halves: step 2 minus step 1 is +1 in every
    # seed, which has no spread to build an interval from
    assert ("| grpo | 3.000 ± 1.000 | 4.000 ± 1.000 | +1.000 in every pair (no spread, so no interval: no difference "
            "measured) | 3.000, 4.000, 5.000 | 0 of 3 |") in md  # each seed's end; below half of GRPO's mean (2.0)?
    # every finished run's logs and pass@k results are kept with the tables (no weights): a study continued on a
    # new machine, whose runs_dir is empty, trains none of them again and tabulates the same numbers
    kept = tmp_path / "study" / "runs" / "saei_a8" / "2steps-seed1"
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.jsonl", "pass_k", "train.log"]
    assert (kept / "train.log").read_text() == (tmp_path / "runs" / "saei_a8" / "2steps-seed1" / "train.log").read_text()
    first = md
    compare.main([f"--runs_dir={tmp_path / 'new_machine'}", f"--out_dir={tmp_path / 'study'}", f"--figures_dir={tmp_path}",
                  "--methods=grpo,saei_a8", "--seeds=3", "--steps=2", "--smooth=2"])
    assert (tmp_path / "study" / "results.md").read_text() == first and not (tmp_path / "new_machine").exists()
    # the tables need only runs.csv: a study whose run folders are gone is tabulated again from it, the same way
    assert compare.retabulate(configurator.get_config(compare.DEFAULTS, [
        "--methods=grpo,saei_a8", "--seeds=3", "--steps=2", f"--out_dir={tmp_path / 'study'}"])) == first
    # results/README.md: every study's tables under its config file's description
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "study_study.py").write_text("# compare.py: two methods, two steps.\n# `python compare.py x`\n")
    compare.write_index(str(tmp_path), str(tmp_path), str(tmp_path / "config"))
    index = (tmp_path / "README.md").read_text()
    assert "## study\n\nTwo methods, two steps.\n" in index and first.rstrip() in index and "python compare.py x" not in index
    assert "![study_curves.png](study_curves.png)" in index
    assert "`python compare.py config/study_study.py --parallel=2`" in index  # repo-relative, wherever configs was
    shutil.rmtree(tmp_path / "study" / "runs")  # (the next checks read runs_dir again)
    curves = (tmp_path / "study" / "curves.csv").read_text().splitlines()
    assert "grpo,entropy_clean,2,3.5" in curves  # seed means 3 and 4 at steps 1 and 2, averaged over the window
    assert os.path.exists(tmp_path / "study_curves.png") and not os.path.exists(tmp_path / "study_strength.png")
    # a study still running: train_missing=False tabulates the finished runs alone, paired on their common seeds
    (tmp_path / "runs" / "saei_a8" / "2steps-seed2" / "train.log").write_text("killed at step 1\n")
    compare.main([f"--runs_dir={tmp_path / 'runs'}", f"--out_dir={tmp_path / 'study'}", f"--figures_dir={tmp_path}",
                  "--methods=grpo:2,saei_a8,saei_a64", "--seeds=3", "--steps=2", "--train_missing=False"])
    md = (tmp_path / "study" / "results.md").read_text()
    assert "| saei_a8 | 2 | 0.650 ± 0.071 |" in md and "| saei_a64 |" not in md
    assert "| grpo | 2 | 0.600 ± 0.141 |" in md  # "grpo:2": its own number of seeds, 0 and 1
    assert "| saei_a8 | +0.050 [-0.585, +0.685]: no difference measured |" in md  # t(0.975, 1) = 12.706


def test_compare_run_killed_mid_study_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A study outlives a session: SIGKILL the whole study mid-run (no handler runs, the lock is left behind) and the
    next `compare.py` resumes that run from its last checkpoint instead of training it again."""
    import signal
    import time
    import checkpoint
    import compare
    config = tmp_path / "tiny.py"  # the smallest train.py run with the demo's cosine schedule (fixed by max_steps)
    config.write_text(f"model = 'tiny'\ndataset = {GEO3K_SAMPLE!r}\nmin_pixels = 3136\nmax_pixels = 3136\n"
                      "max_response_len = 16\nbatch_size = 1\neval_limit = 2\nupdates_per_rollout = 1\nlr = 1e-3\n"
                      "lr_decay = True\nentropy_coef = 0.05\n")
    args = [f"--train_config={config}", "--methods=grpo", "--seeds=1", "--steps=3", "--save_interval=1",
            "--pass_k_problems=0", f"--runs_dir={tmp_path / 'runs'}", f"--out_dir={tmp_path / 'study'}",
            f"--figures_dir={tmp_path}"]
    run = tmp_path / "runs" / "grpo" / "3steps-seed0"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # compare.py's train.py runs: one thread each, as in a study
    study = subprocess.Popen([sys.executable, "compare.py", *args], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not (run.exists() and checkpoint.newest(str(run))):
        time.sleep(0.05)
    os.killpg(study.pid, signal.SIGKILL)  # compare.py and its train.py at once, as the end of a session does
    study.wait()
    assert checkpoint.newest(str(run)) and not compare.trained(str(run)), "the run finished before it was killed"
    assert (run / "LOCK").exists()  # left by the killed train.py: stale, taken over
    before = (run / "metrics.jsonl").read_text().splitlines()
    compare.main(args)
    log = (run / "train.log").read_text()
    assert log.count("--resume=True") == 1 and compare.FINAL.search(log)
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3]  # none repeated or skipped
    # the steps up to the checkpoint were not run again: their lines (timings included) are the killed run's
    kept = sum(line in before for line in after)
    assert kept >= 1 and after[:kept] == before[:kept]


def test_compare_paired_difference_interval():
    import compare
    mean, low, high = compare.paired_difference([0.8, 0.9, 0.7, 0.8], [0.5, 0.5, 0.5, 0.6])
    d = [0.3, 0.4, 0.2, 0.2]  # sd 0.0957; t(0.975, 3) = 3.182
    half = 3.182 * statistics.stdev(d) / 2
    assert (mean, low, high) == pytest.approx((0.275, 0.275 - half, 0.275 + half))
    assert compare.verdict(mean, low, high).endswith("higher") and compare.verdict(-mean, -high, -low).endswith("lower")
    assert compare.paired_difference([0.5], [0.4])[1:] == (None, None)
    # equal differences in every pair (pass@12 moves in steps of 0.005 on 200 problems) give no interval, not a claim,
    # also when float rounding makes them differ in the 16th digit (here: 0.0050000000000000044 and 0.004999999999999893)
    same = compare.paired_difference([0.945, 0.950, 0.940], [0.940, 0.945, 0.935])
    assert same == pytest.approx((0.005, 0.005, 0.005)) and "no difference measured" in compare.verdict(*same)


# ----------------------------------------------------------------------------- plot.py

def test_plot_one_run_draws_its_metrics(tmp_path):
    import plot
    logs = [{"step": s, "reward_clean": 0.1 * s, "reward_adv": 0.2, "entropy_clean": 0.5, "entropy_adv": 0.6,
             "answer_diversity": 3.0, "attack_gain": 0.01 * s, "accuracy_clean": 0.5, "loss": 1.0} for s in range(1, 6)]
    logs[3]["eval_accuracy"] = 0.7
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(log) + "\n" for log in logs)
    series = plot.read_metrics(tmp_path / "metrics.jsonl")
    assert series["eval_accuracy"] == ([4], [0.7]) and series["reward_clean"][1] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert plot.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    png = Image.open(plot.plot(str(tmp_path), window=2))
    assert png.width == pytest.approx(4.2 * 5 * 110, abs=2)  # all five panels: every panel has a metric here
    os.remove(tmp_path / "metrics.png")
    with open(tmp_path / "metrics.jsonl", "w") as f:  # a GRPO run: no attack, no adversarial half
        f.writelines(json.dumps({k: v for k, v in log.items() if "adv" not in k and k != "attack_gain"}) + "\n"
                     for log in logs)
    assert Image.open(plot.plot(str(tmp_path))).width == pytest.approx(4.2 * 4 * 110, abs=2)
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot.plot(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- warmstart.py

def test_warmstart_sft_loss_is_mean_token_cross_entropy():
    """The SFT loss equals cross-entropy on the response tokens computed from full logits, and only those."""
    import warmstart
    from model import load_policy
    policy, tok = load_policy("tiny", seed=0)
    batch = warmstart.sft_batch(tok, data.synthetic_split("train", n=3))
    loss = warmstart.sft_loss(policy, batch)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(batch["input_ids"] == policy.config.image_token_id).int()).logits
    P = batch["prompt_len"]
    ce = torch.nn.functional.cross_entropy(logits[:, P - 1:-1].flatten(0, 1), batch["targets"].flatten(), reduction="none")
    m = batch["target_mask"].flatten().float()
    torch.testing.assert_close(loss, (ce * m).sum() / m.sum(), rtol=1e-4, atol=1e-5)
    # every target row ends with exactly one stop token: the policy learns to end its answer
    assert ((batch["targets"] == tok.eos_token_id) & batch["target_mask"].bool()).sum(1).tolist() == [1, 1, 1]


def test_warmstart_runs_end_to_end_and_checkpoint_loads(tmp_path):
    import warmstart
    from model import load_policy, sample
    out = str(tmp_path / "ws")
    result = warmstart.main(["--steps=3", "--batch_size=2", "--eval_start=2", "--val_n=2", "--test_n=2",
                             "--log_interval=1", f"--out_dir={out}"])
    assert set(result) >= {"accuracy", "format", "loss", "seconds"} and result["loss"] > 0
    # the testbed's warm start continues from a checkpoint (its size) and reports its reasoning's consistency
    score = warmstart.main(["config/warmstart_score.py", f"--init_from={out}", "--steps=2", "--batch_size=2",
                            "--eval_start=1", "--val_n=2", "--test_n=2", "--test_samples=2", f"--out_dir={out}-score"])
    assert 0 <= score["consistency"] <= 1 and 0 <= score["sampled_consistency"] <= 1 and score["steps"] <= 2
    assert os.path.getsize(os.path.join(out, "model.safetensors")) < 5e6
    policy, tok = load_policy(out)
    assert next(policy.parameters()).dtype == torch.float32
    r = data.synthetic_split("test", n=1)[0]
    x = data.load_image(r["images"][0], 112 * 112, 112 * 112)
    got = sample(policy, tok, [data.build_prompt(tok, r["problem"], 16)], [x], 2, 8)
    assert got["response_ids"].shape[0] == 2


# ----------------------------------------------------------------------------- bench.py

def test_bench_quick_configuration_runs():
    rows = bench.main(quick=True)
    measured = {(r[0], r[1].split(" (")[0].split(",")[0]) for r in rows}
    assert {("tiny", "step time"), ("tiny", "rollout tokens/s"), ("tiny-152k", "attack peak memory"),
            ("tiny-152k", "attack time")} <= measured
    step = next(r for r in rows if r[1].startswith("step time"))
    assert float(step[4]) > 0
    memory = next(r for r in rows if r[1].startswith("attack peak memory"))
    assert float(memory[2]) < float(memory[3])  # ours below the full-logits version even at 16 tokens


def test_bench_memory_estimate_counts_the_real_parameters():
    # the estimator's parameter count is the real model's, for the tiny config and its 152k-vocabulary version
    policy, _ = model_lib.load_policy("tiny")
    trainable = sum(p.numel() for n, p in policy.named_parameters() if not n.startswith("model.visual"))
    assert bench.parameters(bench.ARCHS["tiny"]) == (sum(p.numel() for p in policy.parameters()), trainable)
    big, _ = bench.build_model(bench.QWEN_VOCAB)
    assert bench.parameters(bench.ARCHS["tiny-152k"])[0] == sum(p.numel() for p in big.parameters())
    # the per-token activation formula gives the measured bf16 values (issue 13: 133 KiB at 3B, 231 KiB at 7B)
    for name, kib in (("Qwen2.5-VL-3B", 133), ("Qwen2.5-VL-7B", 231)):
        a = bench.ARCHS[name]
        kvd = a["hidden"] // a["heads"] * a["kv_heads"]
        assert bench.activation_bytes(a["hidden"], a["intermediate"], kvd, 2) / 1024 == pytest.approx(kib, rel=0.03)
    e = bench.estimate("Qwen2.5-VL-7B", 8)
    assert e["params_b"] == pytest.approx(8.29, abs=0.01) and e["shards"] < e["update"] < e["attack"]
    assert bench.estimate("Qwen2.5-VL-7B", 16)["shards"] == pytest.approx(e["shards"] / 2)



def test_bench_estimate_sizes_the_rollout_chunk_by_the_budget_and_counts_the_one_gpu_path():
    a, n, P, L = bench.ARCHS["Qwen2.5-VL-3B"], 6, bench.GEO3K_PROMPT_LEN, bench.train.DEFAULTS["max_response_len"]
    per_prompt = model_lib.decode_bytes(a, P, L, n, bench.train.DEFAULTS["max_pixels"] // 196) / bench.GB
    full = bench.estimate("Qwen2.5-VL-3B", 8, gpu_gb=80)
    assert (full["rows_per_call"], full["calls"]) == (384, 2)  # a rank's 64 prompts x 6 fit one call per half
    previous = 384
    for gb in (40, 30, 24):  # smaller GPUs: the most whole prompts within 90% of what the weights leave
        e = bench.estimate("Qwen2.5-VL-3B", 8, gpu_gb=gb)
        assert e["rows_per_call"] % n == 0 and e["rows_per_call"] < previous and e["calls"] == 2 * -(-64 * n // e["rows_per_call"])
        held = e["shards"] + 2 * e["params_b"] * 1e9 / bench.GB  # the shards and the gathered bf16 weights
        share = model_lib.SAMPLING_MEMORY
        assert e["generation"] <= held + share * (gb * 1e9 / bench.GB - held) < e["generation"] + per_prompt
        previous = e["rows_per_call"]
    # one GPU without torchrun: fp32 weights under autocast, fp32 keys, AdamW's transient: 3B needs more than 80 GB
    one = {gb: bench.estimate("Qwen2.5-VL-3B", 1, gpu_gb=gb, prompt_len=2048) for gb in (80, 141)}
    assert max(one[80]["attack"], one[80]["update"]) > 80e9 / bench.GB
    assert max(one[141]["generation"], one[141]["attack"], one[141]["update"]) < 141e9 / bench.GB
    # the predicted step: with a 1 s decode floor, generation is calls x max_response_len seconds (plus prefill)
    slow = bench.estimate("Qwen2.5-VL-3B", 8, floor_s=1.0)
    assert 2 * L < slow["t_generate"] < 2 * L * 1.01 and 0 < slow["t_attack"] < slow["t_update"]
    lines = bench.estimate_table(floors={28: 0.02, 36: 0.02})
    assert "| 432 s |" in lines[-1]  # EasyR1's 180 s for 512 x 5 responses on 8 GPUs, at our 512 x 12
    assert 0 < bench.decode_floor(2, new_tokens=4, repeats=1) < 1


def test_bench_gpu_check_runs_the_recipe_on_a_random_model_and_compares_attack_precisions():
    # the code path `python bench.py --gpu` runs on a GPU, at tiny shapes on CPU: a random model saved and trained
    # for 2 recipe steps from its folder, each phase timed, and the attack's gain in bf16 autocast and fp32
    lines = bench.gpu_check("tiny", device="cpu", prompts=4, response_len=8, steps=2,
                            overrides={"min_pixels": 56 * 56, "max_pixels": 56 * 56})
    phases = {line.split("|")[1].strip(): line.split("|")[2:5] for line in lines if line.startswith("| ") and
              "phase" not in line}
    assert set(phases) == {"generate", "attack", "update"}
    assert all(float(seconds) > 0 and measured.strip() == "-" and float(estimate) > 0
               for seconds, measured, estimate in phases.values())  # no CUDA memory off a GPU
    assert re.search(r"rollout \d+ tokens/s \(48 responses", lines[-2])
    bf16, fp32 = (float(x) for x in re.findall(r"(?:bf16|fp32) ([+-][\d.e-]+)", lines[-1]))
    assert fp32 > 0 and abs(bf16 - fp32) < 0.5 * fp32  # the ascent, in both precisions, about the same
    assert bf16 != fp32  # but really two precisions: bf16's rounding moves the gain (+0.00367 vs +0.00375 here)

# ----------------------------------------------------------------------------- README.md

def test_readme_file_table_and_commands_match_the_repository():
    # the file table's line counts are what a reader plans a reading by: within 10% of the files', and the second
    # command is the one CI runs
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| ((?:`\w+\.py`(?:, )?)+) \| ([\d, ]+) \|", readme, re.M)
    assert len(rows) >= 10
    for files, counts in rows:
        for name, count in zip(re.findall(r"`(\w+\.py)`", files), counts.split(", "), strict=True):
            actual = sum(1 for _ in open(os.path.join(ROOT, name)))
            assert abs(actual - int(count)) <= 0.1 * actual, (name, count, actual)
    commands = re.findall(r"```bash\n(pip install .*)\n```", readme)
    assert commands[0].endswith("&& python train.py")
    assert commands[1].split("&& ")[-1] in open(os.path.join(ROOT, ".ci", "run")).read()


def test_repository_cites_no_document_outside_it():
    # a user's clone holds only these files: a reference to a design document it does not have helps no reader
    files = [os.path.join(folder, name) for folder, dirs, names in os.walk(ROOT) for name in names
             if name.endswith((".py", ".md")) and name != "test_saei.py"
             and not {".venv", "out", ".git", "wandb"} & set(os.path.relpath(folder, ROOT).split(os.sep))]
    assert len(files) > 20  # the repository's code, configs, README, docs and results
    assert [f for f in files if "DESIGN" in open(f, encoding="utf-8").read()] == []


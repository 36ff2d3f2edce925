"""How good it is: greedy, batched evaluation of a checkpoint on the benchmarks, one accuracy table.

`python eval.py --model out/checkpoint --benchmarks geo3k,mmk12,mathvista,mathverse,mathvision,hallusionbench`
prints accuracy per benchmark and their average, and writes to `out_dir`: results.json and results.csv (the
table) and samples.jsonl (every problem: question, response, extracted answer, correct). `--limit 50` for a
quick run. A benchmark can also be a local copy, `mathvista=path/to/copy`, or a local dataset folder (data.py).
A checkpoint of train.py is evaluated as train.py evaluated it: image bounds, response length, prompt instruction
and held-out set come from its training_config.json unless given on the command line.
"""
import csv
import json
import os
import sys

import torch

# ----------------------------------------------------------------------------- constants
model = "tiny"            # checkpoint path, short name (Qwen2.5-VL-7B), hub id or tiny
benchmarks = "synthetic"  # comma-separated names (geo3k,mmk12,mathvista,mathverse,mathvision,hallusionbench),
                          # name=path for a local copy, or a local dataset path
split = "test"            # for the sets with several splits (geo3k, mmk12, local folders); benchmarks have one
limit = 0                 # evaluate the first N problems of each benchmark (0: all)
batch_size = 16
max_prompt_len = 2048     # longer prompts are dropped (and counted), never truncated
max_response_len = 2048
min_pixels = 262144
max_pixels = 1000000
out_dir = "eval_out"
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}


def evaluate(policy, tok, records, min_pixels, max_pixels, max_new_tokens, batch_size=16, instruction=None):
    """Greedy answers to `records` -> {"accuracy", "format", "samples": [per-problem dicts]}. instruction: the
    format instruction appended to each problem (default data.INSTRUCTION)."""
    import data
    instruction = data.INSTRUCTION if instruction is None else instruction
    import rewards
    from model import sample
    samples = []
    was_training = policy.training
    policy.eval()
    for start in range(0, len(records), batch_size):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        images = [data.load_image(r["images"][0], min_pixels, max_pixels) for r in batch]
        prompts = [data.build_prompt(tok, r["problem"], data.n_image_tokens(x), instruction)
                   for r, x in zip(batch, images)]
        out = sample(policy, tok, prompts, images, 1, max_new_tokens, greedy=True)
        for r, text in zip(batch, tok.batch_decode(out["response_ids"], skip_special_tokens=True)):
            s = rewards.score(text, r["answer"], r.get("choices"))
            samples.append({"question": r["problem"], "answer": r["answer"], "choices": r.get("choices") or [],
                            "response": text, "extracted": rewards.extract_answer(text),
                            "correct": bool(s["accuracy"]), "format": bool(s["format"])})
    policy.train(was_training)
    n = max(len(samples), 1)
    return {"accuracy": sum(s["correct"] for s in samples) / n, "format": sum(s["format"] for s in samples) / n,
            "samples": samples}


# what a checkpoint of train.py brings (its training_config.json): eval.py setting <- training constant
FROM_TRAINING = {"min_pixels": "min_pixels", "max_pixels": "max_pixels", "max_response_len": "max_response_len",
                 "max_prompt_len": "max_prompt_len", "benchmarks": "dataset", "split": "eval_split",
                 "limit": "eval_limit"}


def settings(argv):
    """The command line over the defaults; for a checkpoint of train.py, over the settings it was trained and
    evaluated with (image bounds, response length, prompt instruction, held-out set), so it is measured as train.py
    measured it. Says which it used."""
    import checkpoint
    from configurator import override
    cfg = override(DEFAULTS, argv)
    trained = checkpoint.training_config(cfg["model"]) if os.path.isdir(cfg["model"]) else None
    cfg["instruction"] = None  # data.INSTRUCTION
    if trained is None:
        return cfg
    ours = {key: trained["config"][name] for key, name in FROM_TRAINING.items()}
    cfg = dict(override(dict(DEFAULTS, **ours), argv), instruction=trained["instruction"])
    given = {key for key in ours if cfg[key] != ours[key] or override(DEFAULTS, argv)[key] != DEFAULTS[key]}
    used = " ".join(f"{key}={cfg[key]}" for key in ours if key not in given)
    print(f"from {cfg['model']}'s training config: {used}, and its prompt instruction"
          + (f"; from the command line: {' '.join(f'{key}={cfg[key]}' for key in ours if key in given)}" if given else ""))
    return cfg


def main(argv):
    """Evaluate cfg.model on every benchmark; print and write the table. Returns the table's rows."""
    import data
    from model import load_policy
    cfg = type("Config", (), settings(argv))
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, seed=cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows = []
    with open(os.path.join(cfg.out_dir, "samples.jsonl"), "w") as samples_file:
        for spec in cfg.benchmarks.split(","):
            name = spec.partition("=")[0]
            print(f"evaluating {name}")
            records = data.load_records(spec, cfg.split)
            if cfg.limit:
                records = [records[i] for i in range(min(cfg.limit, len(records)))]
            records, counts = data.usable_records(records, tok, cfg.min_pixels, cfg.max_pixels, cfg.max_prompt_len, name)
            result = evaluate(policy, tok, records, cfg.min_pixels, cfg.max_pixels, cfg.max_response_len,
                              cfg.batch_size, cfg.instruction)
            for s in result["samples"]:
                samples_file.write(json.dumps({"benchmark": name, **s}, ensure_ascii=False) + "\n")
            rows.append({"benchmark": name, "accuracy": result["accuracy"], "format": result["format"],
                         "problems": counts["kept"], "dropped": counts["dropped"]})
    average = sum(r["accuracy"] for r in rows) / len(rows)  # unweighted: each benchmark counts once

    w = max(len(r["benchmark"]) for r in rows + [{"benchmark": "benchmark"}]) + 2
    print(f"\n{'benchmark':<{w}}{'accuracy':>10}{'format':>10}{'problems':>10}{'dropped':>10}")
    for r in rows:
        print(f"{r['benchmark']:<{w}}{100 * r['accuracy']:>10.2f}{100 * r['format']:>10.2f}"
              f"{r['problems']:>10}{r['dropped']:>10}")
    print(f"{'average':<{w}}{100 * average:>10.2f}")
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump({"model": cfg.model, "benchmarks": rows, "average": average}, f, indent=2)
    with open(os.path.join(cfg.out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [{"benchmark": "average", "accuracy": average}])
    print(f"wrote {cfg.out_dir}/results.json, results.csv and samples.jsonl")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

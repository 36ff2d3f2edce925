"""How good it is: greedy, batched evaluation of a checkpoint on the benchmarks, one accuracy table.

`python eval.py --model out/checkpoint --benchmarks geo3k,mmk12,mathvista,mathverse,mathvision,hallusionbench,wemath`
prints accuracy per benchmark and their average, and writes to `out_dir`: results.json and results.csv (the
table) and samples.jsonl (every problem: question, response, extracted answer, correct). `--limit 50` for a
quick run. A benchmark can also be a local copy, `mathvista=path/to/copy`, or a local dataset folder (data.py).
`--n_samples 12` also samples 12 answers per problem at the rollout temperature and reports pass@1 (their mean
accuracy) and the unbiased pass@k for k = 2, 4, 8, 12: exploration methods claim to raise pass@k at large k.
A checkpoint of train.py is evaluated as train.py evaluated it: image bounds, response length, temperature and
held-out set come from its training_config.json unless given on the command line.
"""
import csv
import json
import math
import os
import statistics
import sys

import torch

import checkpoint
import configurator
import data
import rewards
from model import check_device, load_policy, sample

# ----------------------------------------------------------------------------- constants
model = "tiny"            # checkpoint path, short name (Qwen2.5-VL-7B), hub id or tiny
benchmarks = "synthetic"  # comma-separated names (geo3k,mmk12,mathvista,mathverse,mathvision,hallusionbench,wemath),
                          # name=path for a local copy, or a local dataset path
split = "test"            # for the sets with several splits (geo3k, mmk12, local folders); benchmarks have one
limit = 0                 # evaluate the first N problems of each benchmark (0: all)
batch_size = 16
n_samples = 0             # > 0: also sample this many responses per problem and report pass@1 ... pass@n_samples
rollout_chunk = 64        # at most this many responses per generate call (memory; 0: a batch's all at once)
temperature = 1.0         # for those samples (the rollout temperature)
max_prompt_len = 2048     # longer prompts are dropped (and counted), never truncated
max_response_len = 2048
min_pixels = 262144
max_pixels = 1000000
instruction_role = "user"  # where the format instruction goes: after the problem (user) or as the system prompt
prompts = "question"      # each benchmark's plain question, or "query": the fields the papers' evaluations use
                          # (MathVista's query, MathVerse's query_cot, HallusionBench asked for a boxed yes or no)
out_dir = "eval_out"
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
device_map = ""           # "auto": spread a checkpoint too big for one GPU over every GPU (needs accelerate)
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k), the chance that k
    samples drawn without replacement from the n hold at least one correct answer."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n):
    """The k reported for n samples: 1, 2, 4, ... and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n}) if n else []


def evaluate(policy, tok, records, min_pixels, max_pixels, max_new_tokens, batch_size=16, n_samples=0,
             temperature=1.0, chunk_rows=0, role="user"):
    """Greedy answers to `records`, and with n_samples > 0 also n_samples sampled answers per problem at
    `temperature` -> {"accuracy", "format", "samples": [per-problem dicts], and "pass@k" for k in ks_for(n_samples)}.
    At most `chunk_rows` responses go through one generate call (0: a batch's all at once).

    pass@1 is the mean accuracy of the samples; pass@k the mean over problems of the unbiased estimator.
    """
    samples = []
    was_training = policy.training
    policy.eval()
    for start in range(0, len(records), batch_size):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        images, prompts = zip(*[data.prepare(r, tok, min_pixels, max_pixels, role) for r in batch])
        out = sample(policy, tok, prompts, images, 1, max_new_tokens, greedy=True, chunk_rows=chunk_rows)
        sampled = [[] for _ in batch]
        if n_samples:
            drawn = sample(policy, tok, prompts, images, n_samples, max_new_tokens, temperature, chunk_rows=chunk_rows)
            for i, text in enumerate(tok.batch_decode(drawn["response_ids"], skip_special_tokens=True)):
                sampled[i // n_samples].append(text)
        for r, text, drawn_texts in zip(batch, tok.batch_decode(out["response_ids"], skip_special_tokens=True), sampled):
            s = rewards.score(text, r["answer"], r.get("choices"))
            samples.append({"question": r["problem"], "answer": r["answer"], "choices": r.get("choices") or [],
                            "response": text, "extracted": rewards.extract_answer(text),
                            "correct": bool(s["accuracy"]), "format": bool(s["format"]), "meta": r.get("meta") or {}})
            if n_samples:
                correct = [rewards.score(t, r["answer"], r.get("choices"))["accuracy"] == 1.0 for t in drawn_texts]
                samples[-1].update({"sampled": [rewards.extract_answer(t) for t in drawn_texts],
                                    "sampled_correct": sum(correct)})
    policy.train(was_training)
    n = max(len(samples), 1)
    result = {"accuracy": sum(s["correct"] for s in samples) / n, "format": sum(s["format"] for s in samples) / n,
              "samples": samples}
    for k in ks_for(n_samples):
        result[f"pass@{k}"] = sum(pass_at_k(n_samples, s["sampled_correct"], k) for s in samples) / n
    return result


def benchmark_scores(name, samples):
    """The scores a benchmark's own papers report besides accuracy (every sample's "correct" and "meta"):
    HallusionBench's aAcc (every question), fAcc (figures whose questions are all right) and qAcc (questions right
    on every figure they are asked about; VLMEvalKit's grouping: category, subcategory, set, figure or question);
    MathVerse's accuracy per problem_version. {} for the others."""
    def all_right(key):
        groups = {}
        for s in samples:
            groups.setdefault(key(s["meta"]), []).append(s["correct"])
        return sum(all(g) for g in groups.values()) / max(1, len(groups))
    if name == "hallusionbench":
        return {"aAcc": sum(s["correct"] for s in samples) / max(1, len(samples)),
                "fAcc": all_right(lambda m: (m["category"], m["subcategory"], m["set_id"], m["figure_id"])),
                "qAcc": all_right(lambda m: (m["category"], m["subcategory"], m["set_id"], m["question_id"]))}
    if name == "mathverse":
        versions = sorted({s["meta"]["problem_version"] for s in samples})
        return {f"accuracy {v}": statistics.mean(s["correct"] for s in samples if s["meta"]["problem_version"] == v)
                for v in versions}
    return {}


# what a checkpoint of train.py brings (its training_config.json): eval.py setting <- training constant
FROM_TRAINING = {"min_pixels": "min_pixels", "max_pixels": "max_pixels", "max_response_len": "max_response_len",
                 "instruction_role": "instruction_role",
                 "max_prompt_len": "max_prompt_len", "temperature": "temperature", "benchmarks": "dataset",
                 "split": "eval_split", "limit": "eval_limit"}


def settings(argv):
    """The command line over the defaults; for a checkpoint of train.py, over the settings it was trained and
    evaluated with (image bounds, response length, temperature, held-out set), so it is measured as train.py
    measured it. Says which it used."""
    cfg = configurator.get_config(DEFAULTS, argv)
    trained = checkpoint.training_config(cfg.model) if os.path.isdir(cfg.model) else None
    if trained is None:
        return cfg
    # (a config of an older train.py may lack some: eval.py's defaults stand in)
    ours = {key: trained["config"][name] for key, name in FROM_TRAINING.items() if name in trained["config"]}
    plain = cfg
    cfg = configurator.get_config(dict(DEFAULTS, **ours), argv)
    given = [key for key in ours if getattr(cfg, key) != ours[key] or getattr(plain, key) != DEFAULTS[key]]
    missing = [key for key in FROM_TRAINING if key not in ours]
    listed = lambda keys: " ".join(f"{key}={getattr(cfg, key)}" for key in keys)
    print(f"from {cfg.model}'s training config: {listed(k for k in ours if k not in given)}"
          + (f"; from the command line: {listed(given)}" if given else "")
          + (f"; not in it, eval.py's own: {listed(missing)}" if missing else ""))
    # the chat template comes with the checkpoint; the instruction does not (an older config may not hold it)
    if trained.get("instruction", data.INSTRUCTION) != data.INSTRUCTION:
        print(f"warning: {cfg.model} was trained with another format instruction than data.INSTRUCTION; "
              f"its answers may not be in the format graded here")
    return cfg


def main(argv):
    """Evaluate cfg.model on every benchmark; print and write the table. Returns the table's rows."""
    cfg = settings(argv)
    for spec in cfg.benchmarks.split(","):  # every name before the model loads: a typo must not cost a whole run
        data.check_dataset(spec)
    if not cfg.temperature > 0:
        raise SystemExit(f"config error: temperature must be > 0, got {cfg.temperature}")
    configurator.check_at_least(cfg, {"limit": 0, "n_samples": 0, "rollout_chunk": 0, "batch_size": 1,
                                      "max_response_len": 1, "max_prompt_len": 1})
    data.check_pixel_bounds(cfg.min_pixels, cfg.max_pixels)
    check_device(cfg.device)
    benchmarks = []  # every benchmark read before the model loads: a failure costs no model load and no evaluation
    for spec in cfg.benchmarks.split(","):
        records = data.load_records(spec, cfg.split, cfg.prompts)
        if cfg.limit:  # (a bad row among them is skipped and counted below, not read here)
            n = min(cfg.limit, len(records))
            records = records.select(range(n)) if hasattr(records, "select") else records[:n]
        benchmarks.append((spec.partition("=")[0], records))
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, seed=cfg.seed,
                              device_map=cfg.device_map)
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows, scores = [], {}
    with open(os.path.join(cfg.out_dir, "samples.jsonl"), "w") as samples_file:
        for name, records in benchmarks:
            print(f"evaluating {name}")
            records, counts = data.usable_records(records, tok, cfg.min_pixels, cfg.max_pixels, cfg.max_prompt_len, name,
                                                  cfg.instruction_role)
            result = evaluate(policy, tok, records, cfg.min_pixels, cfg.max_pixels, cfg.max_response_len,
                              cfg.batch_size, cfg.n_samples, cfg.temperature, cfg.rollout_chunk, cfg.instruction_role)
            for s in result["samples"]:
                samples_file.write(json.dumps({"benchmark": name, **s}, ensure_ascii=False) + "\n")
            samples_file.flush()
            rows.append({"benchmark": name, "accuracy": result["accuracy"], "format": result["format"],
                         **{k: v for k, v in result.items() if k.startswith("pass@")},
                         "problems": counts["kept"], "dropped": counts["dropped"]})
            scores[name] = benchmark_scores(data.ALIASES.get(name, name), result["samples"])
            average = write_results(cfg, rows, scores)  # after each benchmark: a later failure loses none of these

    w = max(len(r["benchmark"]) for r in rows + [{"benchmark": "benchmark"}]) + 2
    rates = [k for k in rows[0] if k not in ("benchmark", "problems", "dropped")]  # accuracy, format, pass@k...
    print(f"\n{'benchmark':<{w}}" + "".join(f"{k:>10}" for k in rates) + f"{'problems':>10}{'dropped':>10}")
    for r in rows:
        print(f"{r['benchmark']:<{w}}" + "".join(f"{100 * r[k]:>10.2f}" for k in rates) +
              f"{r['problems']:>10}{r['dropped']:>10}")
    print(f"{'average':<{w}}{100 * average:>10.2f}")
    for name, extra in scores.items():
        if extra:
            print(f"{name}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in extra.items()))
    print("grading: rule-based (mathruler's string and sympy equivalence), no LLM judge")
    print(f"wrote {cfg.out_dir}/results.json, results.csv and samples.jsonl")
    return rows


def write_results(cfg, rows, scores):
    """results.json and results.csv: the table of `rows` (one per benchmark) and their average, and each
    benchmark's own scores. Returns the average accuracy, unweighted: each benchmark counts once."""
    average = sum(r["accuracy"] for r in rows) / len(rows)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump({"model": cfg.model, "n_samples": cfg.n_samples, "temperature": cfg.temperature, "benchmarks": rows,
                   "average": average, "scores": scores, "instruction_role": cfg.instruction_role,
                   "prompts": cfg.prompts, "grading": "rule-based (mathruler), no LLM judge"}, f, indent=2)
    with open(os.path.join(cfg.out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [{"benchmark": "average", "accuracy": average,
                                  **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith("pass@")}}])
    return average


if __name__ == "__main__":
    main(sys.argv[1:])

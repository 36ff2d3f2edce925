"""Two evaluations of the same held-out problems, compared problem by problem: pass@k before -> after, the mean
difference with a 95% interval over problems (compare.py's paired_difference), the problems solved within n samples that were
lost or gained, and the distinct answers per problem.

    python results/collapse/paired.py results/collapse/evals/warm_start/samples.jsonl \
        results/collapse/evals/grpo_seed0/samples.jsonl

Each file is eval.py's samples.jsonl, run with the same --n_samples and --limit (the problems must match).
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from compare import paired_difference  # noqa: E402
from eval import ks_for, pass_at_k  # noqa: E402


def load(path):
    return [json.loads(line) for line in open(path)]


def main(before_path, after_path):
    before, after = load(before_path), load(after_path)
    if [(x["question"], x["answer"]) for x in before] != [(x["question"], x["answer"]) for x in after]:
        raise SystemExit("the two files do not hold the same problems in the same order")
    n = len(before[0]["sampled"])
    for k in ks_for(n):
        a = [pass_at_k(n, x["sampled_correct"], k) for x in before]
        b = [pass_at_k(n, x["sampled_correct"], k) for x in after]
        mean, low, high = paired_difference(b, a)
        print(f"pass@{k}: {statistics.mean(a):.3f} -> {statistics.mean(b):.3f}, "
              f"difference {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    solved = lambda x: x["sampled_correct"] > 0
    lost = sum(solved(x) and not solved(y) for x, y in zip(before, after))
    gained = sum(solved(y) and not solved(x) for x, y in zip(before, after))
    print(f"problems solved within {n} samples: {lost} lost, {gained} gained, of {len(before)}")
    distinct = lambda rows: statistics.mean(len({s for s in x["sampled"] if s is not None}) for x in rows)
    print(f"distinct answers per problem in {n} samples: {distinct(before):.2f} -> {distinct(after):.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])

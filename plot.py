"""Watch one run: its metrics.jsonl drawn against step, one PNG.

`python plot.py out` reads out/metrics.jsonl (one JSON line per training step, written by train.py) and writes
out/metrics.png: reward, accuracy (the rollouts' and the held-out greedy one), rollout entropy (clean half, and
the adversarial half on the image it was sampled on), the attack's gain on the TsEC objective, and answer
diversity, each against step. Panels whose metrics a run does not log (GRPO has no attack) are left out.
Noisy per-step values are drawn faint, with a moving average of `smooth` steps over them.
Needs matplotlib (`pip install matplotlib`), an optional dependency like wandb.
"""
import json
import os
import sys

smooth = 10  # moving-average window in steps

# panel title -> the metrics.jsonl keys drawn in it
PANELS = {
    "reward": ["reward_clean", "reward_adv"],
    "accuracy": ["accuracy_clean", "accuracy_adv", "eval_accuracy"],
    "rollout entropy (nats/token)": ["entropy_clean", "entropy_adv"],
    "attack gain on the TsEC objective (nats)": ["attack_gain"],
    "distinct answers per group": ["answer_diversity", "answer_diversity_clean", "answer_diversity_adv"],
}


def read_metrics(path):
    """metrics.jsonl -> {key: ([steps], [values])} for every numeric key."""
    series = {}
    for line in open(path):
        log = json.loads(line)
        for key, value in log.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, ([], []))
                series[key][0].append(log["step"])
                series[key][1].append(value)
    return series


def moving_average(values, window):
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot(run_dir, window=smooth):
    """Draw run_dir/metrics.jsonl into run_dir/metrics.png. Returns the PNG's path."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics.jsonl in '{run_dir}': pass a train.py out_dir")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    series = read_metrics(path)
    panels = {title: [k for k in keys if k in series] for title, keys in PANELS.items()}
    panels = {title: keys for title, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            steps, values = series[key]
            if key == "eval_accuracy":  # a few evaluation points, not a per-step series
                ax.plot(steps, values, "o-", label=key, markersize=4)
                continue
            line, = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), color=line.get_color(), label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(run_dir, fontsize=9)
    fig.tight_layout()
    out = os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python plot.py OUT_DIR [OUT_DIR ...]")
    for run in sys.argv[1:]:
        print(f"wrote {plot(run)}")

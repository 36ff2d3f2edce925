"""SaEI against its rivals on one task: every method x every seed, one table, three curves.

`python compare.py` trains each method with each seed (train.py in a subprocess: the base config, then the
method's overrides), then writes to out_dir:
  results.md, results.csv  per method: final held-out greedy accuracy (mean ± std over seeds), mean rollout
                           entropy and mean answer diversity (distinct answers per group) over training
  runs.csv                 the same per run;  curves.csv  the per-step means behind the plots
  curves.png               accuracy, rollout entropy and answer diversity against step (needs matplotlib)
A finished run (its train.log ends with the final accuracy) is never redone: an interrupted comparison continues
where it stopped, and calling it again only rewrites the table. Quick look:
`python compare.py --steps=20 --seeds=1 --methods=grpo,saei`; another task: `--dataset=geometry3k`; on a 2-core
laptop `--parallel=2` runs two single-threaded runs at once.
"""
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# ----------------------------------------------------------------------------- constants
config = "config/demo.py"    # base train.py config every method starts from
dataset = ""                 # "" keeps the config's dataset; else any train.py dataset (name or path)
steps = 100                  # training steps per run
seeds = 3                    # runs per method: seeds 0 .. seeds - 1
methods = "grpo,noisyrollout,saei,saei_no_tsec,vepo,saei_vepo"  # which of METHODS, comma-separated
eval_interval = 20           # held-out accuracy every this many steps: the accuracy curve's points
smooth = 10                  # moving-average window (steps) of the entropy and diversity curves
out_dir = "out/compare"
parallel = 1                 # runs at once; each gets cpu_count // parallel torch threads (2 on a 2-core laptop)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}

# DESIGN §7: every method samples 12 responses per prompt, so they differ only in how and what they learn from
SAEI = ["--n_clean=6", "--n_adv=6", "--perturb=egas"]
GRPO = ["--n_clean=12", "--n_adv=0"]
METHODS = {
    "grpo": GRPO,
    "noisyrollout": ["--n_clean=6", "--n_adv=6", "--perturb=noise"],
    "saei": SAEI,
    "saei_no_tsec": SAEI + ["--tsec_band=(0.0, 1.0)"],
    "vepo": GRPO + ["--pg_tokens=vepo"],
    "saei_vepo": SAEI + ["--pg_tokens=vepo"],
}
ROOT = os.path.dirname(os.path.abspath(__file__))
FINAL = re.compile(r"held-out greedy accuracy: ([\d.]+) before -> ([\d.]+) after")


def run(cfg, method, seed):
    """Train one method with one seed into out_dir/method/seedN (unless already done). Returns that folder."""
    path = os.path.join(cfg.out_dir, method, f"seed{seed}")
    log_path = os.path.join(path, "train.log")
    if os.path.exists(log_path) and FINAL.search(open(log_path).read()):
        return path
    shutil.rmtree(path, ignore_errors=True)  # a half-finished run: metrics.jsonl appends, so start clean
    os.makedirs(path)
    args = [sys.executable, "train.py", cfg.config, *METHODS[method], f"--seed={seed}", f"--max_steps={cfg.steps}",
            f"--eval_interval={cfg.eval_interval}", f"--save_interval={cfg.steps}", f"--out_dir={path}"]
    args += [f"--dataset={cfg.dataset}"] if cfg.dataset else []
    with open(log_path, "w") as log:
        log.write(" ".join(args) + "\n")
        log.flush()
        # parallel runs must not oversubscribe the cores (an OMP_NUM_THREADS already set wins)
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cfg.parallel))
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        code = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not FINAL.search(open(log_path).read()):
        raise SystemExit(f"{method} seed {seed} failed or stopped early (exit {code}); see {log_path}")
    shutil.rmtree(os.path.join(path, "checkpoint"), ignore_errors=True)  # only the metrics are compared
    return path


def read_run(path):
    """A run's folder -> {start, final, entropy, diversity, curve}: accuracies from train.log, per-step metrics
    (rollout entropy, answer diversity, held-out accuracy at eval steps) from metrics.jsonl."""
    start, final = map(float, FINAL.search(open(os.path.join(path, "train.log")).read()).groups())
    logs = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    accuracy = {0: start, **{l["step"]: l["eval_accuracy"] for l in logs if "eval_accuracy" in l}}
    accuracy[logs[-1]["step"]] = final
    return {"start": start, "final": final,
            "entropy": statistics.mean(l["entropy"] for l in logs),
            "diversity": statistics.mean(l["answer_diversity"] for l in logs),
            "curve": {"step": [l["step"] for l in logs], "entropy": [l["entropy"] for l in logs],
                      "diversity": [l["answer_diversity"] for l in logs], "accuracy": accuracy}}


def summarize(runs):
    """{method: [run dicts]} -> table rows, one per method: mean and seed-to-seed std of the final accuracy."""
    rows = []
    for method, rs in runs.items():
        finals = [r["final"] for r in rs]
        rows.append({"method": method, "runs": len(rs), "start_accuracy": statistics.mean(r["start"] for r in rs),
                     "final_accuracy": statistics.mean(finals),
                     "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else None,  # undefined
                     "rollout_entropy": statistics.mean(r["entropy"] for r in rs),
                     "answer_diversity": statistics.mean(r["diversity"] for r in rs),
                     "overrides": " ".join(METHODS[method])})
    return rows


def write_table(rows, cfg):
    with open(os.path.join(cfg.out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"`python compare.py --config={cfg.config} --steps={cfg.steps} --seeds={cfg.seeds}"
             + (f" --dataset={cfg.dataset}" if cfg.dataset else "") + "`", "",
             "| method | runs | accuracy before | final accuracy (mean ± std) | rollout entropy | answer diversity "
             "| overrides |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {r['final_accuracy_std']:.3f}" if r["final_accuracy_std"] is not None else ""
        lines.append(f"| {r['method']} | {r['runs']} | {r['start_accuracy']:.3f} | {r['final_accuracy']:.3f}{spread} "
                     f"| {r['rollout_entropy']:.3f} | {r['answer_diversity']:.2f} | `{r['overrides']}` |")
    text = "\n".join(lines) + "\n"
    open(os.path.join(cfg.out_dir, "results.md"), "w").write(text)
    return text


def mean_curves(runs, window):
    """{method: [run dicts]} -> {method: {metric: (steps, seed-mean values)}}; entropy and diversity smoothed
    by a trailing moving average of `window` steps (one rollout batch is noisy)."""
    curves = {}
    for method, rs in runs.items():
        steps_ = rs[0]["curve"]["step"]
        out = {}
        for key in ("entropy", "diversity"):
            mean = [statistics.mean(r["curve"][key][i] for r in rs) for i in range(len(steps_))]
            out[key] = (steps_, [statistics.mean(mean[max(0, i - window + 1):i + 1]) for i in range(len(mean))])
        points = sorted(rs[0]["curve"]["accuracy"])
        out["accuracy"] = (points, [statistics.mean(r["curve"]["accuracy"][s] for r in rs) for s in points])
        curves[method] = out
    return curves


def write_curves(curves, cfg):
    with open(os.path.join(cfg.out_dir, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "metric", "step", "value"])
        for method, metrics in curves.items():
            for metric, (xs, ys) in metrics.items():
                writer.writerows([method, metric, x, y] for x, y in zip(xs, ys))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: curves.png skipped (pip install matplotlib); curves.csv has the data")
        return
    titles = {"accuracy": "held-out greedy accuracy", "entropy": "rollout entropy (nats/token)",
              "diversity": "distinct answers per group"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (metric, title) in zip(axes, titles.items()):
        for method, metrics in curves.items():
            ax.plot(*metrics[metric], label=method, marker="o" if metric == "accuracy" else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "curves.png"), dpi=120)


def main(argv):
    from configurator import get_config
    cfg = get_config(DEFAULTS, argv)
    names = cfg.methods.split(",")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: use some of {','.join(METHODS)}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    jobs = [(m, s) for m in names for s in range(cfg.seeds)]
    t0 = time.time()

    def one(job):
        path = run(cfg, *job)
        r = read_run(path)
        print(f"{job[0]} seed {job[1]}: accuracy {r['start']:.3f} -> {r['final']:.3f} "
              f"({time.time() - t0:.0f} s since start)", flush=True)
        return r
    with ThreadPoolExecutor(cfg.parallel) as pool:  # threads only wait on train.py subprocesses
        done = list(pool.map(one, jobs))
    runs = {m: [r for (method, _), r in zip(jobs, done) if method == m] for m in names}
    with open(os.path.join(cfg.out_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "start_accuracy", "final_accuracy", "rollout_entropy", "answer_diversity"])
        writer.writerows([m, s, r["start"], r["final"], r["entropy"], r["diversity"]]
                         for m in names for s, r in enumerate(runs[m]))
    print(write_table(summarize(runs), cfg))
    write_curves(mean_curves(runs, cfg.smooth), cfg)
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])

"""SaEI against its rivals on one task: every method x every seed, tables with seed spreads and paired intervals.

`python compare.py` trains each method with each seed (train.py in a subprocess: the base config, then the
method's overrides), measures pass@k of each final checkpoint (eval.py), then writes to out_dir:
  results.md, results.csv  per method: mean ± std over seeds of the final held-out greedy accuracy, pass@1 and
                           pass@k, rollout entropy (clean half; adversarial half on its own image), attack gain,
                           answer diversity; each method's difference from `reference`, paired by seed, with its
                           95% t-interval (a difference whose interval holds 0 is "no difference measured"); and
                           whether the perturbation changed the rollouts at all: adversarial minus clean half
  runs.csv                 the same numbers per run: every number in the tables traces back to its runs
  curves.csv               the per-step seed means behind the plots
and its figures as PNGs to figures_dir (assets/): <study>_curves.png, and <study>_strength.png when SaEI ran at
several strengths (study = the last folder of out_dir). The studies in README are config files:
`python compare.py config/study_alpha.py`.

Methods: the names in METHODS, and `saei_a<N>` = SaEI at pgd_alpha = N/255 (budget N/255 at one PGD step),
`saei_a<N>_<band>` the same with the TsEC band bottom, top or all (the default band is the middle third).
`methods` may give a method its own number of seeds: "grpo,saei_a32,saei_a-32:3".
Runs train in runs_dir/<method>/<steps>steps-seed<seed>, shared by every study; a finished run's logs and pass@k
results (not its weights) are then kept in out_dir/runs/ and committed with the tables. A finished run (its
train.log ends with the final accuracy, its pass@k measured), kept or in runs_dir, is never redone and a run that
was stopped continues from its last checkpoint (every save_interval steps), so an interrupted study continues where
it stopped, on this machine or another, and a second study reuses the first one's runs. Quick look: `python compare.py --steps=20 --seeds=1
--methods=grpo,saei --runs_dir=out/quick --out_dir=out/quick`; on a 2-core laptop `--parallel=2` runs two
single-threaded runs at once.
"""
import csv
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import checkpoint
import configurator

# ----------------------------------------------------------------------------- constants
train_config = "config/demo.py"  # base train.py config every method starts from
dataset = ""                 # "" keeps the config's dataset; else any train.py dataset (use another runs_dir)
train_args = ""              # more train.py arguments for every run, space-separated ("--eval_limit=2000")
steps = 100                  # training steps per run
seeds = 3                    # runs per method: seeds 0 .. seeds - 1
methods = "grpo,noisyrollout,saei,saei_no_tsec,vepo,saei_vepo"  # comma-separated, see above
reference = "grpo"           # differences are measured against this method (when it is among `methods`)
pass_k = 12                  # eval.py samples this many answers per problem on each final checkpoint: pass@1..pass@k
pass_k_problems = 200        # ... on this many held-out problems (0: no pass@k)
smooth = 10                  # moving-average window (steps) of the curves: one rollout batch is noisy
runs_dir = "out/compare"     # every run of every study
out_dir = "results/methods"  # this study's tables
figures_dir = "assets"       # its figures, <study>_*.png (README shows them from here)
train_missing = True         # False: only tabulate the runs already finished (a study still running elsewhere)
parallel = 1                 # runs at once; each gets cpu_count // parallel torch threads (2 on a 2-core laptop)
save_interval = 20           # steps between a run's checkpoints: a study killed mid-run continues from the last one
tail_steps = 10              # "where the entropy ended up": the mean over each run's last this many steps
retabulate = False           # True: only rewrite out_dir's tables from its runs.csv (run folders not needed)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}

# every method samples 12 responses per prompt, so they differ only in how and what they learn from
SAEI = ["--n_clean=6", "--n_adv=6", "--perturb=egas"]
GRPO = ["--n_clean=12", "--n_adv=0"]
METHODS = {
    "grpo": GRPO,
    "noisyrollout": ["--n_clean=6", "--n_adv=6", "--perturb=noise"],
    "saei": SAEI,
    "saei_no_tsec": SAEI + ["--tsec_band=(0.0, 1.0)"],
    "vepo": GRPO + ["--pg_tokens=vepo"],
    "saei_vepo": SAEI + ["--pg_tokens=vepo"],
    "random_sign": ["--n_clean=6", "--n_adv=6", "--perturb=random_sign"],  # the attack's budget, random directions
    "clip_higher": GRPO + ["--clip_high=0.28"],  # DAPO's clip-higher
    "kl_cov": GRPO + ["--cov_control=kl_cov"],
    "clip_cov": GRPO + ["--cov_control=clip_cov"],
}
BANDS = {"bottom": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "top": (2 / 3, 1.0), "all": (0.0, 1.0)}
VARIANTS = {"behaviour": ["--adv_old_logprob=behaviour"], "advimage": ["--logprob_image=adversarial"],
            "behaviournodual": ["--adv_old_logprob=behaviour", "--clip_dual=0"]}  # the corrected ratio, PPO-clip alone
STRENGTH = re.compile(r"saei_a(-?\d+)(?:_(bottom|middle|top|all))?(?:_(" + "|".join(VARIANTS) + "))?$")
ROOT = os.path.dirname(os.path.abspath(__file__))
FINAL = re.compile(r"held-out greedy accuracy: ([\d.]+) before -> ([\d.]+) after")
START = re.compile(r"held-out greedy accuracy before training: ([\d.]+)")  # the first one: a resumed run logs two
# two-sided 95% quantiles of Student's t with df = 1 .. 10 degrees of freedom (beyond: the normal 1.96)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def overrides(method):
    """A method's name -> its train.py arguments (SystemExit naming the choices for an unknown one)."""
    if method in METHODS:
        return METHODS[method]
    match = STRENGTH.match(method)
    if not match:
        raise SystemExit(f"unknown method {method!r}: use one of {','.join(METHODS)}, saei_a<N> (pgd_alpha = N/255, "
                         f"N may be negative), saei_a<N>_<band> (band: {', '.join(BANDS)}), and either with a variant "
                         f"_<{'|'.join(VARIANTS)}>")
    alpha, band, variant = match.groups()
    return (SAEI + [f"--pgd_alpha={int(alpha) / 255!r}", f"--tsec_band={BANDS[band or 'middle']!r}"]
            + VARIANTS.get(variant, []))


def alpha_of(method):
    """255 * pgd_alpha of a saei_a<N> method on the default band, else None (the x axis of the strength plot)."""
    match = STRENGTH.match(method)
    return int(match.group(1)) if match and match.group(2) in (None, "middle") and not match.group(3) else None


def run_dir(cfg, method, seed):
    return os.path.join(cfg.runs_dir, method, f"{cfg.steps}steps-seed{seed}")


def kept_dir(cfg, method, seed):
    """Where a finished run's record is kept with the study's tables (committed with them, so a study that spans
    machines never trains a run twice, and every per-seed number can be checked): out_dir/runs/..."""
    return os.path.join(cfg.out_dir, "runs", method, f"{cfg.steps}steps-seed{seed}")


KEPT = ("train.log", "metrics.jsonl", "eval.log", "pass_k/results.json", "pass_k/samples.jsonl")  # no weights


def trained(path):
    log_path = os.path.join(path, "train.log")
    return os.path.exists(log_path) and FINAL.search(open(log_path).read()) is not None


def complete(cfg, path):
    """Trained, and its pass@k measured (when asked for)."""
    return trained(path) and (not cfg.pass_k_problems or os.path.exists(os.path.join(path, "pass_k", "results.json")))


def finished(cfg, method, seed):
    return complete(cfg, kept_dir(cfg, method, seed)) or complete(cfg, run_dir(cfg, method, seed))


def method_seeds(cfg):
    """cfg.methods ("grpo,saei:3": a method's own number of seeds after a colon) -> [(method, seeds)]."""
    pairs = [m.partition(":") for m in cfg.methods.split(",")]
    return [(name, int(n) if n else cfg.seeds) for name, _, n in pairs]


def run(cfg, method, seed):
    """Train one method with one seed (unless already done), then measure its pass@k. Returns the run's folder."""
    path, kept = run_dir(cfg, method, seed), kept_dir(cfg, method, seed)
    log_path, ckpt = os.path.join(path, "train.log"), os.path.join(path, "checkpoint")
    if complete(cfg, kept):
        return kept
    if complete(cfg, path):
        return keep(path, kept)
    # parallel runs must not oversubscribe the cores (an OMP_NUM_THREADS already set wins)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cfg.parallel))
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    if not (trained(path) and os.path.isdir(ckpt)):  # not trained, or pass@k missing and its checkpoint gone
        # stopped after a checkpoint (a killed session): continue it, which ends as the uninterrupted run would
        resume = not trained(path) and checkpoint.newest(path) is not None  # (None for a missing folder)
        if not resume:  # new, or stopped before its first checkpoint: start clean (metrics.jsonl appends)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
        args = [sys.executable, "train.py", cfg.train_config, *overrides(method), f"--seed={seed}",
                f"--max_steps={cfg.steps}", f"--save_interval={min(cfg.save_interval, cfg.steps)}", f"--out_dir={path}"]
        args += [f"--dataset={cfg.dataset}"] if cfg.dataset else []
        args += cfg.train_args.split()
        args += ["--resume=True"] if resume else []
        with open(log_path, "a" if resume else "w") as log:
            log.write(" ".join(args) + "\n")
            log.flush()
            code = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0 or not FINAL.search(open(log_path).read()):
            raise SystemExit(f"{method} seed {seed} failed or stopped early (exit {code}); see {log_path}")
    if cfg.pass_k_problems:  # the final checkpoint, evaluated as it was trained, k samples per problem
        args = [sys.executable, "eval.py", f"--model={ckpt}", f"--limit={cfg.pass_k_problems}",
                f"--n_samples={cfg.pass_k}", f"--out_dir={os.path.join(path, 'pass_k')}"]
        with open(os.path.join(path, "eval.log"), "w") as log:
            code = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"pass@k of {method} seed {seed} failed (exit {code}); see {path}/eval.log")
    shutil.rmtree(ckpt, ignore_errors=True)  # only the metrics are compared
    return keep(path, kept)


def keep(path, kept):
    """Copy a finished run's logs and results (not its weights) to `kept`; returns kept."""
    for name in KEPT:
        if os.path.exists(os.path.join(path, name)):
            os.makedirs(os.path.dirname(os.path.join(kept, name)), exist_ok=True)
            shutil.copyfile(os.path.join(path, name), os.path.join(kept, name))
    return kept


# per-step metrics.jsonl keys averaged over the run: name in the tables <- key
MEANS = {"entropy_clean": "entropy_clean", "entropy_adv": "entropy_adv", "attack_gain": "attack_gain",
         "attack_gain_rel": "attack_gain_rel", "attack_linf": "attack_linf", "diversity_clean": "answer_diversity_clean",
         "diversity_adv": "answer_diversity_adv", "diversity": "answer_diversity", "train_accuracy": "accuracy_clean",
         "train_accuracy_adv": "accuracy_adv"}
CURVES = {"train_accuracy": "accuracy_clean", "entropy_clean": "entropy_clean", "entropy_adv": "entropy_adv",
          "diversity": "answer_diversity"}


def read_run(path, tail_steps=10):
    """A run's folder -> {metric: value} (accuracies from train.log, pass@k from eval.py, per-step means from
    metrics.jsonl; a metric the method does not log is absent) and, under "logs", its metrics.jsonl lines."""
    log = open(os.path.join(path, "train.log")).read()
    start, final = float(START.search(log).group(1)), float(FINAL.search(log).group(2))
    logs = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    r = {"start_accuracy": start, "final_accuracy": final}
    results = os.path.join(path, "pass_k", "results.json")
    if os.path.exists(results):
        r.update({k: v for k, v in json.load(open(results))["benchmarks"][0].items() if k.startswith("pass@")})
    for name, key in MEANS.items():
        if key in logs[0]:
            r[name] = statistics.mean(l[key] for l in logs)
    # where the entropy started and ended up: a collapse shows here, not in the mean over the run
    window = max(1, min(tail_steps, len(logs) // 2))  # tail_steps, or half of a shorter run
    r["entropy_clean_first"] = statistics.mean(l["entropy_clean"] for l in logs[:window])
    r["entropy_clean_last"] = statistics.mean(l["entropy_clean"] for l in logs[-window:])
    r["logs"] = logs  # per step: the curves and the two halves' step-by-step comparison read them
    return r


def mean_std(values):
    """'mean ± std' over seeds (sample std; one seed: the mean alone)."""
    return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1
            else f"{values[0]:.3f}")


def paired_difference(a, b):
    """Paired differences a[i] - b[i] (two methods at the same seed, or two halves of the same step) -> (mean,
    low, high): their mean and its 95% t-interval; (mean, None, None) for fewer than 2 pairs; (mean, mean, mean)
    when every pair differs by the same amount (a metric on a grid, a few seeds): no spread, so no interval."""
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return mean, None, None
    if max(d) - min(d) < 1e-9:  # float noise aside, a zero-width "interval" would claim certainty from 2-3 pairs
        return mean, mean, mean
    half = (T95[len(d) - 2] if len(d) - 1 <= len(T95) else 1.96) * statistics.stdev(d) / len(d) ** 0.5
    return mean, mean - half, mean + half


def verdict(mean, low, high):
    if low is None:
        return f"{mean:+.3f} (one seed: no interval)"
    if low == high and mean != 0:
        return f"{mean:+.3f} in every pair (no spread, so no interval: no difference measured)"
    word = "no difference measured" if low <= 0 <= high else ("higher" if low > 0 else "lower")
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]: {word}"


def tables(runs, cfg):
    """{method: [run dicts by seed]} -> (per-method rows for results.csv, results.md text)."""
    metrics = [k for k in ["start_accuracy", "final_accuracy", "pass@1", f"pass@{cfg.pass_k}", "entropy_clean",
                           "entropy_adv", "entropy_clean_first", "entropy_clean_last", "attack_gain",
                           "attack_gain_rel", "attack_linf", "diversity", "diversity_clean", "diversity_adv",
                           "train_accuracy", "train_accuracy_adv"]
               if any(k in r for rs in runs.values() for r in rs)]
    rows = []
    for method, rs in runs.items():
        row = {"method": method, "runs": len(rs)}
        for k in metrics:
            values = [r[k] for r in rs if k in r]
            if values:
                row[k] = statistics.mean(values)
                row[k + "_std"] = statistics.stdev(values) if len(values) > 1 else ""
        rows.append(row)
    outcomes = {"final_accuracy": "greedy accuracy", "pass@1": "pass@1", f"pass@{cfg.pass_k}": f"pass@{cfg.pass_k}"}
    mechanism = {"entropy_clean": "entropy, clean half", "entropy_adv": "entropy, other half on its image",
                 "entropy_clean_last": f"entropy, clean half, last {cfg.tail_steps} steps",
                 "attack_gain": "attack gain (nats)",
                 "attack_gain_rel": "attack gain / objective", "attack_linf": "L-inf distance (/255)",
                 "diversity": "distinct answers per group"}
    lines = [f"`python compare.py` with methods={cfg.methods} steps={cfg.steps} seeds={cfg.seeds} "
             f"train_config={cfg.train_config}" + (f" dataset={cfg.dataset}" if cfg.dataset else "")
             + (f" train_args='{cfg.train_args}'" if cfg.train_args else ""), "",
             f"Mean ± std over seeds. Held-out greedy accuracy before training: "
             f"{mean_std([r['start_accuracy'] for rs in runs.values() for r in rs])} (all {cfg.steps}-step runs start "
             f"from the same checkpoint); pass@k on the first {cfg.pass_k_problems} held-out problems. Entropies "
             "(nats/token), attack and diversity are means over the run's steps."]
    for names in (outcomes, mechanism):
        shown = [k for k in names if k in metrics]
        lines += ["", "| method | runs | " + " | ".join(names[k] for k in shown) + " |", "|---|---|" + "---|" * len(shown)]
        for method, rs in runs.items():
            cells = [mean_std([r[k] for r in rs]) if all(k in r for r in rs) else "" for k in shown]
            lines.append(f"| {method} | {len(rs)} | " + " | ".join(cells) + " |")
    if cfg.reference in runs and len(runs) > 1:
        compared = [k for k in ("final_accuracy", "pass@1", f"pass@{cfg.pass_k}", "entropy_clean",
                                "entropy_clean_last", "diversity") if k in metrics]
        lines += ["", f"Difference from {cfg.reference}, paired by seed (same prompts, same order): mean [95% t-interval "
                      "over the seed pairs]", "",
                  "| method | " + " | ".join({**outcomes, **mechanism}[k] for k in compared) + " |",
                  "|---|" + "---|" * len(compared)]
        ref = runs[cfg.reference]
        for method, rs in runs.items():
            if method == cfg.reference:
                continue
            pairs = [(r, q) for r in rs for q in ref if q["seed"] == r["seed"]]
            cells = [verdict(*paired_difference([r[k] for r, _ in pairs], [q[k] for _, q in pairs])) for k in compared]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n = cfg.tail_steps
    lines += ["", f"Does the clean rollouts' entropy fall during training? Mean over the last {n} steps minus the first "
                  f"{n} [95% t-interval over seeds]; each seed's last {n} steps"
              + (f"; seeds whose last {n} steps are below half of {cfg.reference}'s mean there" if cfg.reference in runs
                 else ""), "",
              f"| method | first {n} steps | last {n} steps | change | each seed, last {n} steps |"
              + (" below half |" if cfg.reference in runs else ""), "|---|---|---|---|---|"
              + ("---|" if cfg.reference in runs else "")]
    half = (statistics.mean(r["entropy_clean_last"] for r in runs[cfg.reference]) / 2 if cfg.reference in runs
            else None)
    for method, rs in runs.items():
        first, last = [r["entropy_clean_first"] for r in rs], [r["entropy_clean_last"] for r in rs]
        lines.append(f"| {method} | {mean_std(first)} | {mean_std(last)} | {verdict(*paired_difference(last, first))} | "
                     + ", ".join(f"{v:.3f}" for v in last) + " |"
                     + (f" {sum(v < half for v in last)} of {len(last)} |" if half is not None else ""))
    halves = [m for m, rs in runs.items() if all("entropy_adv" in r for r in rs)]
    if halves:  # does the perturbation change the rollouts at all? The two halves of the same groups
        checks = [("entropy", "entropy_adv", "entropy_clean"), ("accuracy", "train_accuracy_adv", "train_accuracy"),
                  ("distinct answers", "diversity_adv", "diversity_clean")]
        lines += ["", "Does the perturbation change the rollouts? The other half minus the clean half of the same "
                      "groups (6 responses each, same prompts, same policy): each seed's mean over its steps, then "
                      "their mean [95% t-interval over seeds] (the seed is the unit: steps of one run are not "
                      "independent); each seed's own mean in brackets",
                  "",
                  "| method | seeds | " + " | ".join(c[0] for c in checks) + " |", "|---|---|" + "---|" * len(checks)]
        for method in halves:
            cells = []
            for _, a, b in checks:
                per_seed = [r[a] - r[b] for r in runs[method]]  # means over steps: the mean of the differences
                cells.append(verdict(*paired_difference(per_seed, [0.0] * len(per_seed))) + " (" +
                             ", ".join(f"{d:+.3f}" for d in per_seed) + ")")
            lines.append(f"| {method} | {len(runs[method])} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def mean_curves(runs, window):
    """{method: [run dicts]} -> {method: {metric: (steps, seed means smoothed by a trailing window)}}."""
    curves = {}
    for method, rs in runs.items():
        steps_ = [l["step"] for l in rs[0]["logs"]]
        curves[method] = {}
        for name, key in CURVES.items():
            if key in rs[0]["logs"][0]:
                mean = [statistics.mean(r["logs"][i][key] for r in rs) for i in range(len(steps_))]
                curves[method][name] = (steps_, [statistics.mean(mean[max(0, i - window + 1):i + 1])
                                                 for i in range(len(mean))])
    return curves


def write_figures(runs, curves, cfg):
    """assets/<study>_curves.png: the curves against step; assets/<study>_strength.png: final accuracy, pass@k and
    rollout entropy against the attack strength, the other methods as horizontal bands (mean ± std)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib); the CSVs have the data")
        return []
    study = os.path.basename(os.path.normpath(cfg.out_dir))
    titles = {"train_accuracy": "accuracy of the clean rollouts", "entropy_clean": "entropy, clean rollouts (nats)",
              "entropy_adv": "entropy, adversarial rollouts on their image", "diversity": "distinct answers per group"}
    fig, axes = plt.subplots(1, len(titles), figsize=(4.5 * len(titles), 4))
    for ax, (metric, title) in zip(axes, titles.items()):
        for i, (method, c) in enumerate(curves.items()):
            if metric in c:  # a method keeps its colour in every panel, even where others have no line
                ax.plot(*c[metric], label=method, color=f"C{i}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"seed means, {cfg.smooth}-step moving average", fontsize=9)
    fig.tight_layout()
    paths = [os.path.join(cfg.figures_dir, f"{study}_curves.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    swept = sorted((alpha_of(m), m) for m in runs if alpha_of(m) is not None)
    if len(swept) < 2:
        return paths
    panels = {"final_accuracy": "held-out greedy accuracy", "pass@1": "pass@1",
              f"pass@{cfg.pass_k}": f"pass@{cfg.pass_k}", "entropy_adv": "entropy of the adversarial rollouts"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (metric, title) in zip(axes, panels.items()):
        xs = [a for a, m in swept if all(metric in r for r in runs[m])]
        values = [[r[metric] for r in runs[m]] for a, m in swept if all(metric in r for r in runs[m])]
        if values:
            ax.errorbar(xs, [statistics.mean(v) for v in values],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], marker="o", capsize=3,
                        label="SaEI")
            for x, v in zip(xs, values):
                ax.scatter([x] * len(v), v, s=8, color="grey", zorder=3)
        for i, other in enumerate(m for m in runs if alpha_of(m) is None):
            v = [r.get("entropy_clean" if metric == "entropy_adv" else metric) for r in runs[other]]
            if None in v:
                continue
            mean, std = statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0
            color = f"C{i + 1}"
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.2)
            ax.axhline(mean, color=color, label=other + (" (clean rollouts)" if metric == "entropy_adv" else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("PGD step size alpha (/255), T = 1")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("mean ± std over seeds (dots: seeds); bands: mean ± std of the other methods", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(cfg.figures_dir, f"{study}_strength.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def retabulate(cfg):
    """results.md and results.csv again from out_dir/runs.csv alone: a study whose run folders are gone (the tables'
    verdicts need only each run's final metrics and its means over steps; curves.csv is left as it is)."""
    renamed = {"entropy_clean_first10": "entropy_clean_first", "entropy_clean_last10": "entropy_clean_last"}
    runs = {}
    for row in csv.DictReader(open(os.path.join(cfg.out_dir, "runs.csv"))):
        r = {renamed.get(k, k): float(v) for k, v in row.items() if k not in ("method", "seed") and v != ""}
        runs.setdefault(row["method"], []).append(dict(r, seed=int(row["seed"])))
    rows, text = tables(runs, cfg)
    write_csv(os.path.join(cfg.out_dir, "results.csv"), rows)
    open(os.path.join(cfg.out_dir, "results.md"), "w").write(text)
    return text


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in records for k in r)))  # every column
        writer.writeheader()
        writer.writerows(records)


def write_index(results="results", figures="assets", configs="config"):
    """results/README.md: every study's tables (its results.md), under the description its config file gives, with
    its command and figures. Generated, so no number in it is copied by hand."""
    lines = ["# Results", "", "Generated by `compare.py` from each study's `results.md` (do not edit by hand). Each "
             "study is one command; its runs' logs and pass@k results are under `<study>/runs/`, one line per run in "
             "`<study>/runs.csv`, the per-step seed means behind its figures in `<study>/curves.csv`."]
    for study in sorted(os.listdir(results)):
        table = os.path.join(results, study, "results.md")
        if not os.path.isfile(table):
            continue
        config = os.path.join(configs, f"study_{study}.py")
        about = [line[2:].rstrip() for line in open(config) if line.startswith("# ") and "python compare.py" not in line
                 ] if os.path.isfile(config) else []  # the study file's own description, its command line aside
        about[:1] = [about[0].removeprefix("compare.py: ").capitalize()] if about else []
        lines += ["", f"## {study}", ""] + about + ([""] if about else [])
        if os.path.isfile(config):
            lines += [f"`python compare.py config/study_{study}.py --parallel=2`", ""]  # as typed in the repository
        lines += [open(table).read().rstrip()]
        for png in sorted(glob.glob(os.path.join(figures, f"{study}_*.png"))):
            lines += ["", f"![{os.path.basename(png)}]({os.path.relpath(png, results)})"]
    open(os.path.join(results, "README.md"), "w").write("\n".join(lines) + "\n")


def main(argv):
    cfg = configurator.get_config(DEFAULTS, argv)
    if cfg.retabulate:
        print(retabulate(cfg))
        write_index()
        return None
    seeds = method_seeds(cfg)
    names = [m for m, _ in seeds]
    for m in names:
        overrides(m)  # every name checked before hours of training
    os.makedirs(cfg.out_dir, exist_ok=True)
    jobs = [(m, s) for s in range(max(n for _, n in seeds)) for m, n in seeds if s < n]  # every method's seed 0 first
    t0 = time.time()

    def one(job):
        path = run(cfg, *job)
        r = dict(read_run(path, cfg.tail_steps), seed=job[1])
        print(f"{job[0]} seed {job[1]}: accuracy {r['start_accuracy']:.3f} -> {r['final_accuracy']:.3f} "
              f"({time.time() - t0:.0f} s since start)", flush=True)
        return r
    if not cfg.train_missing:  # what has finished so far
        jobs = [(m, s) for m, s in jobs if finished(cfg, m, s)]
        if not jobs:
            raise SystemExit(f"no finished run of {cfg.methods} in {cfg.runs_dir}")
    with ThreadPoolExecutor(cfg.parallel) as pool:  # threads only wait on train.py subprocesses
        done = list(pool.map(one, jobs))
    runs = {m: [r for (method, _), r in zip(jobs, done) if method == m] for m in names}
    runs = {m: rs for m, rs in runs.items() if rs}
    per_run = [{"method": m, "seed": r["seed"], **{k: v for k, v in r.items() if k != "logs"}}
               for m, rs in runs.items() for r in rs]
    rows, text = tables(runs, cfg)
    write_csv(os.path.join(cfg.out_dir, "runs.csv"), per_run)
    write_csv(os.path.join(cfg.out_dir, "results.csv"), rows)
    open(os.path.join(cfg.out_dir, "results.md"), "w").write(text)
    curves = mean_curves(runs, cfg.smooth)
    with open(os.path.join(cfg.out_dir, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "metric", "step", "value"])
        for method, metrics in curves.items():
            for metric, (xs, ys) in metrics.items():
                writer.writerows([method, metric, x, round(y, 6)] for x, y in zip(xs, ys))
    print(text)
    for path in write_figures(runs, curves, cfg):
        print(f"wrote {path}")
    if os.path.abspath(os.path.dirname(os.path.normpath(cfg.out_dir))) == os.path.join(ROOT, "results"):
        write_index(os.path.join(ROOT, "results"), os.path.join(ROOT, cfg.figures_dir), os.path.join(ROOT, "config"))
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])

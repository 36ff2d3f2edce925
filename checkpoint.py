"""How a run is saved and resumed: one folder per run (`out_dir`), one checkpoint in it, never lost.

A checkpoint, `{out_dir}/checkpoint`, is a complete Hugging Face model folder (weights, config, tokenizer with its
chat template, `preprocessor_config.json` whose settings reproduce data.py's pixel map, a greedy
`generation_config.json`, a model card `README.md`) plus what training needs to continue:
`training_config.json` (the resolved config, which eval.py also reads), `optimizer/` (AdamW's state, written and
read shard by shard with torch.distributed.checkpoint: no rank holds all of it) and `trainer_state.pt` (step and
every rank's RNG state), written last: a folder without it is incomplete.

A save writes `checkpoint.tmp` and renames it into place (`checkpoint` -> `checkpoint.old`, `checkpoint.tmp` ->
`checkpoint`, then `checkpoint.old` is deleted), so a kill at any moment leaves at least one complete folder, and
`start` finds the newest. Only rank 0 decides what to resume; every rank must see the same folder (out_dir on a
filesystem every node shares). A lock file keeps a second run out of a busy `out_dir`.

Resuming trusts the checkpoint folder: `trainer_state.pt` is read with `weights_only=True` and the optimizer's
`.metadata` (a pickle) may only name the classes torch.distributed.checkpoint writes there, but the weights and
tokenizer are read by transformers as they come.
"""
import contextlib
import datetime
import json
import os
import pickle
import shutil
import signal
import socket
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from transformers import GenerationConfig
from transformers.utils import cached_file

import data
import egas
from distributed import all_reduce_sum
from model import HUB_MODELS, stop_token_ids, vision_token_ids

NAMES = ("checkpoint", "checkpoint.tmp", "checkpoint.old")  # the live folder, the one being written, the previous
MARKER = "trainer_state.pt"      # written last: a folder without it is incomplete
CONFIG_FILE = "training_config.json"
LOCK_FILE = "LOCK"
SAVE_TIMEOUT = datetime.timedelta(hours=2)  # the other ranks wait this long for rank 0 to write a 32B model
# values that may change on --resume=True: they change what is logged or kept, not the updates
# (max_steps too, unless a schedule depends on it: see check_resume)
FREE_ON_RESUME = {"out_dir", "resume", "overwrite", "max_steps", "eval_interval", "eval_limit", "save_interval",
                  "max_skipped_updates", "device",
                  # memory settings: the same computation in other pieces (equal up to float rounding)
                  "micro_batch_size", "gradient_checkpointing", "rollout_chunk", "attack_rows"}
# a failed read or write: torch.distributed.checkpoint's exception is a BaseException, which `except Exception` misses
FAILED_IO = (Exception, CheckpointException)

_group = None   # a gloo process group with a long timeout for the coordination around saves (CPU objects only)
_lock = None    # the lock file this process holds


# ----------------------------------------------------------------------------- starting a run

def start(cfg, rank, world):
    """Before the model loads: lock out_dir, refuse to mix runs, find what to resume. Returns the checkpoint path
    to resume from, or None for a new run. Every problem is one line (SystemExit) on every rank."""
    global _group
    if world > 1 and _group is None:
        _group = dist.new_group(backend="gloo", timeout=SAVE_TIMEOUT)
    error, step = None, None
    if rank == 0:
        try:
            step = _start_rank0(cfg, world)
        except SystemExit as e:
            error = str(e)
    error, step = _from_rank0((error, step), world)
    if error:
        raise SystemExit(error)
    if step is None:
        return None
    path = os.path.join(cfg.out_dir, NAMES[0])
    # rank 0 resumes from `path`; each rank must read that same folder (its optimizer shards and RNG state)
    blind = [r for r, ok in enumerate(_gather(_step_of(path) == step, world)) if not ok]
    if blind:
        raise SystemExit(f"resume: rank(s) {', '.join(map(str, blind))} cannot see {path} (step {step}) that rank 0 "
                         f"resumes from; out_dir must be on a filesystem every node shares")
    return path


def _start_rank0(cfg, world):
    out_dir = cfg.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create out_dir '{out_dir}': {e.strerror}; pass a writable --out_dir") from None
    lock(out_dir)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    found = [name for name in NAMES if os.path.exists(os.path.join(out_dir, name))]
    held = found + ["metrics.jsonl"] * os.path.exists(metrics)
    path = newest(out_dir)
    if not cfg.resume:
        if held and not cfg.overwrite:  # (with --overwrite=True, `clear` deletes it once the new run has started)
            what, resume = ("a run", "continue it with --resume=True, ") if path else ("a run with no checkpoint", "")
            raise SystemExit(f"{out_dir} already holds {what} ({', '.join(held)}): {resume}pick another --out_dir, "
                             f"or --overwrite=True to replace it")
        return None
    if path is None:
        start_over = ("--overwrite=True instead of --resume=True starts over there" if held
                      else "drop --resume to start a new run")
        raise SystemExit(f"--resume=True but {out_dir} holds no complete checkpoint"
                         f"{' (only incomplete ' + ', '.join(found) + ')' if found else ''}: {start_over}")
    check_resume(path, cfg, world)
    promote(out_dir, path)
    step = _step_of(os.path.join(out_dir, NAMES[0]))
    if os.path.exists(metrics):  # steps logged after the checkpoint will run again: drop their lines
        _cut_metrics(metrics, step)
    return step


def _cut_metrics(metrics, step):
    """Keep the lines of metrics.jsonl up to `step`, and drop a line a kill cut short (it is not JSON)."""
    lines, torn = [], 0
    for line in open(metrics):
        try:
            if json.loads(line)["step"] <= step:
                lines.append(line.rstrip("\n") + "\n")
        except (ValueError, KeyError, TypeError):
            torn += line.strip() != ""
    if torn:
        print(f"{metrics}: dropped {torn} line(s) that a kill or a full disk cut short")
    with open(metrics + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(metrics + ".tmp", metrics)


def clear(out_dir):
    """Delete the run a new one replaces (--overwrite=True), once the new one has started: its inputs checked and
    its model loaded, so that a typo in them does not cost the old run."""
    old = [name for name in (*NAMES, "metrics.jsonl") if os.path.exists(os.path.join(out_dir, name))]
    for name in old:
        path = os.path.join(out_dir, name)
        remove(path) if os.path.isdir(path) else os.remove(path)
    if old:
        print(f"--overwrite=True: deleted the previous run's {', '.join(old)} in {out_dir}")


def check_resume(path, cfg, world):
    """Stop with one line if the run being resumed had another config: the same flags must continue the same run."""
    trained = training_config(path)
    if trained is None or "world_size" not in trained:
        raise SystemExit(f"resume: {path} has no {CONFIG_FILE} with the run's config and world_size (written by an "
                         f"older train.py); start a new run")
    damage = _optimizer_damage(path)
    if damage:
        raise SystemExit(f"resume: {path} is damaged ({damage}); start a new run, or resume from a copy of the run")
    saved, now = trained["config"], json.loads(json.dumps(config_dict(cfg)))  # tuples as lists, like the file
    if trained["world_size"] != world:
        raise SystemExit(f"resume: {path} was trained on {trained['world_size']} rank(s), this run has {world}; "
                         f"resume with the same number of processes")
    scheduled = saved.get("lr_decay") or saved.get("perturb") == "noise"  # the schedules run over max_steps
    for key in sorted(set(saved) & set(now)):
        if saved[key] != now[key] and (key not in FREE_ON_RESUME or key == "max_steps" and scheduled):
            raise SystemExit(f"resume: {key} is {now[key]!r} but the checkpoint was trained with {saved[key]!r}; "
                             f"resume with --{key}={saved[key]!r}, or start a new run in another out_dir")


def config_dict(cfg):
    """The resolved config (a class of constants) as a plain dict."""
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def training_config(path):
    """{config, world_size, step, instruction, ...} a checkpoint folder was trained with, or None if it has none; a
    damaged file stops with one line."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        return None
    try:
        trained = json.load(open(file))
    except (ValueError, UnicodeDecodeError) as e:  # a JSONDecodeError is a ValueError
        raise SystemExit(f"{file} is damaged (not JSON: {e}); delete it to use the folder as a plain model") from None
    if not isinstance(trained, dict) or not isinstance(trained.get("config"), dict):
        raise SystemExit(f"{file} holds no training config; delete it to use the folder as a plain model")
    return trained


class _MetadataUnpickler(pickle.Unpickler):
    """Reads torch.distributed.checkpoint's `.metadata` (a pickle) allowing only what it writes there: its own
    record classes, torch sizes, dtypes and layouts, paths. Anything else (os.system...) is refused unread."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which torch.distributed.checkpoint does not write")


def _optimizer_damage(path):
    """Why `path`'s optimizer state cannot be resumed (an unreadable `.metadata`, a missing shard), or None."""
    folder = os.path.join(path, "optimizer")
    try:
        with open(os.path.join(folder, ".metadata"), "rb") as f:
            shards = {info.relative_path for info in _MetadataUnpickler(f).load().storage_data.values()}
    except OSError as e:
        return f"optimizer/.metadata: {e.strerror}"
    except Exception as e:  # a crafted or cut-short pickle
        return f"optimizer/.metadata is unreadable: {_reason(e)}"
    missing = sorted(name for name in shards if not os.path.isfile(os.path.join(folder, name)))
    return f"optimizer/{missing[0]} is missing" if missing else None


# ----------------------------------------------------------------------------- finding the newest checkpoint

def _step_of(path):
    """The step of a complete checkpoint folder, None if it is missing or incomplete (a kill mid-write)."""
    try:
        return torch.load(os.path.join(path, MARKER), weights_only=True)["step"]  # data only: no code runs
    except Exception:
        return None


def newest(out_dir):
    """The newest complete checkpoint folder among checkpoint, checkpoint.tmp and checkpoint.old, or None."""
    steps = {name: _step_of(os.path.join(out_dir, name)) for name in NAMES}
    complete = [name for name in NAMES if steps[name] is not None]
    return os.path.join(out_dir, max(complete, key=lambda n: steps[n])) if complete else None


def promote(out_dir, path):
    """Make `path` (the newest complete folder) the live `checkpoint` and delete the others, each move one a kill
    can interrupt with the newest complete folder still found by `newest`."""
    live, tmp, old = (os.path.join(out_dir, name) for name in NAMES)
    if path == tmp:
        _commit(out_dir)
    elif path == old:
        remove(tmp)
        remove(live)
        os.replace(old, live)
    remove(tmp)
    remove(old)


def _commit(out_dir):
    """checkpoint.tmp (complete) becomes checkpoint; the previous one is kept as checkpoint.old until then."""
    live, tmp, old = (os.path.join(out_dir, name) for name in NAMES)
    if os.path.exists(live):
        remove(old)
        os.replace(live, old)
    os.replace(tmp, live)
    remove(old)


def remove(path):
    """Delete a checkpoint folder, its marker first: a kill halfway leaves a folder `newest` ignores."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MARKER)):
            os.remove(os.path.join(path, MARKER))
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- the lock on out_dir

def lock(out_dir):
    """Take {out_dir}/LOCK (pid and host of the holder) or stop with one line; a lock whose process is gone is stale
    and taken over."""
    global _lock
    path = os.path.join(out_dir, LOCK_FILE)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, _, host = open(path).read().partition(" ")
            if host.strip() == socket.gethostname() and pid.isdigit() and (not _alive(int(pid)) or int(pid) == os.getpid()):
                os.remove(path)  # stale: its process died (or an earlier run in this one failed) without releasing it
                continue
            raise SystemExit(f"{out_dir} is in use by another run (process {pid} on {host.strip() or '?'}, {path}); "
                             f"wait for it, pick another --out_dir, or delete {path} if no run is using it") from None
        except OSError as e:
            raise SystemExit(f"cannot write to out_dir '{out_dir}': {e.strerror}; pass a writable --out_dir") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        _lock = path
        return
    raise SystemExit(f"{out_dir}: could not take {path}; another run is starting there")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def unlock():
    """Release the lock this process holds (train.py's teardown calls it; a second call does nothing)."""
    global _lock
    if _lock is not None:
        try:
            os.remove(_lock)
        except OSError:
            pass
        _lock = None


# ----------------------------------------------------------------------------- saving and loading

def save(policy, tok, optimizer, step, cfg, rank, world, held_out=None):
    """Write checkpoint.tmp and rename it into place: the model in Hugging Face format (gathered on rank 0), the
    optimizer sharded (each rank writes its own part), the run's config, model card and RNG states.
    held_out: {"accuracy", "format", "problems", "step"} of the latest evaluation, for the model card, or None.
    Every rank must call it with FSDP2 groups resharded. A failed write (disk full...) stops with one line on
    every rank; the previous checkpoint stays whole."""
    out_dir = cfg.out_dir
    live, tmp = os.path.join(out_dir, NAMES[0]), os.path.join(out_dir, NAMES[1])
    model_state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if getattr(policy.config, "tie_word_embeddings", False):  # (Qwen2.5-VL-3B) gathered from FSDP2, the tied LM head
        for tied in policy._tied_weights_keys or {}:          # comes back as a copy of the embedding: store it once,
            model_state.pop(tied, None)                       # as transformers does (+1.24 GB at 3B otherwise)
    # frozen weights (the vision tower) have no optimizer state; the state-dict API must be told
    optim_state = get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = _gather(rng, world)
    error = None
    try:
        if rank == 0:
            try:
                remove(tmp)
                policy.save_pretrained(tmp, state_dict=model_state)
                write_model_files(tmp, cfg, tok, step, world, held_out)
            except FAILED_IO as e:  # a full disk shows as OSError, safetensors' own error, torch's RuntimeError...
                error = _reason(e)
        del model_state
        _raise_failed(_from_rank0(error, world), tmp, live)
        try:
            os.makedirs(os.path.join(tmp, "optimizer"), exist_ok=True)
            with _quiet():
                dcp.save({"optimizer": optim_state}, checkpoint_id=os.path.join(tmp, "optimizer"),
                         process_group=_group, no_dist=world == 1)
        except FAILED_IO as e:  # torch.distributed.checkpoint raises the same CheckpointException on every rank
            error = _reason(e)
        _raise_failed(error, tmp, live)
        _barrier(world)  # every rank's shards are on disk
        if rank == 0:
            try:
                torch.save({"step": step, "rng": rngs, "world_size": world}, os.path.join(tmp, MARKER))
                _commit(out_dir)
            except FAILED_IO as e:
                error = _reason(e)
        _raise_failed(_from_rank0(error, world), tmp, live)
    except BaseException:  # a failed write, or a second Ctrl-C mid-save: no partial copy stays behind
        if rank == 0 and _step_of(tmp) is None:  # (a complete one is the newest checkpoint: `start` finds it)
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _raise_failed(error, tmp, live):
    if error is not None:
        kept = f"the previous checkpoint {live} (step {_step_of(live)}) is intact" if _step_of(live) else "no checkpoint kept"
        raise SystemExit(f"cannot write the checkpoint to {tmp}: {error}; {kept}")


def _reason(e):
    """An exception -> one line: the words of the OSError behind it (e.g. 'No space left on device'; torch's writer
    wraps it in a RuntimeError, torch.distributed.checkpoint that in its own exception), else its first line."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]  # the first rank's
    cause = e
    while cause is not None:
        if getattr(cause, "strerror", None):
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load(policy, optimizer, path, rank):
    """Restore the optimizer (this rank's shards only) and this rank's RNG state. Returns the checkpoint's step."""
    options = StateDictOptions(ignore_frozen_params=True)
    state = {"optimizer": get_optimizer_state_dict(policy, optimizer, options=options)}  # the shapes to fill
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=os.path.join(path, "optimizer"), process_group=_group, no_dist=_group is None)
    except FAILED_IO as e:  # a shard cut short (start checked that every one is there)
        raise SystemExit(f"resume: cannot read the optimizer state in {path}: {_reason(e)}") from None
    set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=options)
    trainer = torch.load(os.path.join(path, MARKER), weights_only=True)
    rng = trainer["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer["step"]


# ----------------------------------------------------------------------------- collectives (gloo, long timeout)

@contextlib.contextmanager
def _quiet():
    """torch.distributed.checkpoint warns on every single-process save and load that it is single-process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield


def _from_rank0(obj, world):
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_group)
    return box[0]


def _gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=_group)
    return out


def _barrier(world):
    if world > 1:
        dist.barrier(group=_group)


# ----------------------------------------------------------------------------- what makes the folder usable

def write_model_files(path, cfg, tok, step, world, held_out):
    """Everything besides the weights that a Hugging Face user (and eval.py) needs: tokenizer and chat template,
    the image processor config, a greedy generation config, the training config and the model card."""
    tok.save_pretrained(path)
    base = HUB_MODELS.get(cfg.model, cfg.model)
    processor = {"image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
                 "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(data.CLIP_MEAN), "image_std": list(data.CLIP_STD), "patch_size": data.PATCH,
                 "temporal_patch_size": data.TEMPORAL, "merge_size": data.MERGE}
    base_file = _base_file(base, "preprocessor_config.json")
    if base_file:
        processor = json.load(open(base_file))  # the base's own, with this run's image bounds below
    # the run's image area bounds, in both spellings transformers reads (4.x: min/max_pixels, 5.x: size)
    processor.update(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                     size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
    # eval.py's decoding: greedy, our stop tokens, no vision special tokens, nothing else (no repetition penalty)
    GenerationConfig(do_sample=False, max_new_tokens=cfg.max_response_len, eos_token_id=stop_token_ids(tok),
                     pad_token_id=tok.pad_token_id, suppress_tokens=vision_token_ids(tok),
                     repetition_penalty=1.0).save_pretrained(path)
    trained = {"config": config_dict(cfg), "world_size": world, "step": step, "instruction": data.INSTRUCTION,
               "held_out": held_out}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(trained, f, indent=2)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(model_card(trained, base))


def _base_file(base, name):
    """The base checkpoint's copy of `name` (a local folder, or the hub cache the model was loaded from), or None."""
    if os.path.isdir(base):
        path = os.path.join(base, name)
        return path if os.path.isfile(path) else None
    if base == "tiny":
        return None
    try:
        return cached_file(base, name, _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline and not cached: write ours
        return None


def method_name(c):
    """The method a config runs, in words: SaEI, GRPO, NoisyRollout, ... with VEPO/80-20 token selection."""
    if c["n_adv"] == 0:
        name = "GRPO"
    else:
        name = egas.PERTURBATIONS[c["perturb"]][0] if c["perturb"] in egas.PERTURBATIONS else c["perturb"]
    extra = {"vepo": " + VEPO token selection", "top_entropy": " + top-20% entropy tokens", "all": ""}[c["pg_tokens"]]
    extra += {"kl_cov": " + KL-Cov", "clip_cov": " + Clip-Cov"}.get(c.get("cov_control", "none"), "")
    return name + extra


def model_card(trained, base):
    """A short README.md: what the folder is, how it was trained, how well it did, how to use it."""
    c, step, held = trained["config"], trained["step"], trained["held_out"]
    method = method_name(c)
    if c["n_adv"] and c["perturb"] == "egas":
        detail = (f"{c['n_clean']} clean + {c['n_adv']} rollouts per prompt on an EgAS-attacked image (PGD "
                  f"{c['pgd_steps']} step(s), alpha {c['pgd_alpha']:.4g}, eps {c['pgd_eps']:.4g}, TsEC band "
                  f"{tuple(round(b, 3) for b in c['tsec_band'])} per {c['tsec_scope']})")
    elif c["n_adv"] and c["perturb"] == "random_sign":
        detail = (f"{c['n_clean']} clean + {c['n_adv']} rollouts per prompt on an image moved in random +/- directions "
                  f"({c['pgd_steps']} step(s) of {c['pgd_alpha']:.4g}, eps {c['pgd_eps']:.4g}: EgAS's budget)")
    elif c["n_adv"] and c["perturb"] == "noise":
        detail = f"{c['n_clean']} clean + {c['n_adv']} rollouts per prompt on a noised image"
    else:
        detail = f"{c['n_clean'] + c['n_adv']} rollouts per prompt"
    accuracy = (f"{100 * held['accuracy']:.1f}% (format {100 * held['format']:.1f}%), greedy, on {held['problems']} "
                f"problems of {c['dataset']}/{c['eval_split']}, measured at step {held['step']}"
                if held and held["problems"] else "not measured")
    hub = f"base_model: {base}\n" if "/" in base and not os.path.isdir(base) else ""
    return f"""---
{hub}library_name: transformers
pipeline_tag: image-text-to-text
tags: [qwen2.5-vl, grpo, {method.split()[0].lower()}]
---
# {method} fine-tune of {base}

Trained with `train.py` of the SaEI reference implementation (RL fine-tuning with GRPO).

- base model: {base}
- method: {method}: {detail}; lr {c['lr']:g}, temperature {c['temperature']:g}, clip {c['clip_low']}/{c['clip_high']}
- steps: {step} of {c['max_steps']}, {c['batch_size']} prompts per step, {trained['world_size']} rank(s)
- data: {c['dataset']} ({c['train_split']} split); images resized to {c['min_pixels']}..{c['max_pixels']} pixels;
  responses up to {c['max_response_len']} tokens
- held-out accuracy: {accuracy}

Every constant of the run is in `training_config.json`; `python eval.py --model <this folder>` evaluates it with
them. It loads with `Qwen2_5_VLForConditionalGeneration` (or `AutoModelForImageTextToText`) and
`AutoProcessor` (which needs `torchvision`; `AutoImageProcessor` and `AutoTokenizer` do not). The prompt ends
with the format instruction it was trained with (`instruction` in `training_config.json`);
`generation_config.json` decodes greedily, as the evaluation did.
"""


STOP_SIGNALS = ("SIGINT", "SIGTERM")


def install_stop_handlers():
    """SIGINT/SIGTERM finish the current step, save a checkpoint and stop, instead of dying mid-write."""
    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
    previous = {sig: signal.signal(sig, handler) for sig in (getattr(signal, name) for name in STOP_SIGNALS)}
    stop["restore"] = lambda: [signal.signal(sig, h) for sig, h in previous.items()]
    return stop


def signal_on_any_rank(stop):
    """The name of the stop signal any rank got (every rank gets the same answer), or None."""
    counts = all_reduce_sum(torch.tensor([float(stop["signal"] == name) for name in STOP_SIGNALS]))
    return next((name for name, n in zip(STOP_SIGNALS, counts.tolist()) if n > 0), None)

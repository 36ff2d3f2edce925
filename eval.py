"""How good it is: greedy, batched evaluation of a checkpoint on a dataset split.

`python eval.py --model out/checkpoint --dataset synthetic --split test` prints accuracy and format rate.
"""
import sys

import torch

# ----------------------------------------------------------------------------- constants
model = "tiny"            # checkpoint path, short name (Qwen2.5-VL-7B) or tiny
dataset = "synthetic"
split = "test"
limit = 0                 # evaluate the first N problems (0: all)
batch_size = 16
max_response_len = 2048
min_pixels = 262144
max_pixels = 1000000
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))}


def evaluate(policy, tok, records, min_pixels, max_pixels, max_new_tokens, batch_size=16):
    """Greedy answers to `records` -> {"accuracy", "format", "samples": [per-problem dicts]}."""
    import data
    import rewards
    from model import sample
    samples = []
    was_training = policy.training
    policy.eval()
    for start in range(0, len(records), batch_size):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        images = [data.load_image(r["images"][0], min_pixels, max_pixels) for r in batch]
        prompts = [data.build_prompt(tok, r["problem"], data.n_image_tokens(x)) for r, x in zip(batch, images)]
        out = sample(policy, tok, prompts, images, 1, max_new_tokens, greedy=True)
        for r, text in zip(batch, tok.batch_decode(out["response_ids"], skip_special_tokens=True)):
            s = rewards.score(text, r["answer"], r.get("choices"))
            samples.append({"problem": r["problem"], "answer": r["answer"], "response": text,
                            "extracted": rewards.extract_answer(text), "correct": bool(s["accuracy"]),
                            "format": bool(s["format"])})
    policy.train(was_training)
    n = max(len(samples), 1)
    return {"accuracy": sum(s["correct"] for s in samples) / n, "format": sum(s["format"] for s in samples) / n,
            "samples": samples}


def main(argv):
    from configurator import override
    from data import load_records
    from model import load_policy
    cfg = type("Config", (), override(DEFAULTS, argv))
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, seed=cfg.seed)
    records = load_records(cfg.dataset, cfg.split)
    if cfg.limit:
        records = [records[i] for i in range(min(cfg.limit, len(records)))]
    result = evaluate(policy, tok, records, cfg.min_pixels, cfg.max_pixels, cfg.max_response_len, cfg.batch_size)
    print(f"{cfg.dataset}/{cfg.split}: accuracy {result['accuracy']:.4f}  format {result['format']:.4f}  "
          f"({len(result['samples'])} problems)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

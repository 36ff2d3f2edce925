"""The synthetic task and the warm start (issue 3): the generator is deterministic and right, its splits are
disjoint, its worked solutions earn full reward, and warmstart.py runs end to end into a loadable checkpoint."""
import os
import re

import torch

import data
import rewards


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
        # the worked solution reads the same grid, row by row
        assert r["solution"].startswith("<think>" + " ".join(cells[i:i + 4] for i in range(0, 16, 4)) + "</think>")
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
    assert os.path.getsize(os.path.join(out, "model.safetensors")) < 5e6
    policy, tok = load_policy(out)
    assert next(policy.parameters()).dtype == torch.float32
    r = data.synthetic_split("test", n=1)[0]
    x = data.load_image(r["images"][0], 112 * 112, 112 * 112)
    got = sample(policy, tok, [data.build_prompt(tok, r["problem"], 16)], [x], 2, 8)
    assert got["response_ids"].shape[0] == 2

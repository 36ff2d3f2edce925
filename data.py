"""Images and text -> model inputs, and the datasets they come from.

One pixel pipeline: `load_image` resizes once in PIL, outside autograd, to a size `smart_resize`
picks; `image_to_pixels` does everything after that as a differentiable torch function of the [0, 1] image,
so the clean rollouts, the EgAS attack and the policy update all see the image the same way, and gradients
reach the raw pixels. A test holds it equal to transformers' Qwen2-VL image processor.
"""
import functools
import itertools
import math
import os
import random
import re
import zlib

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw

PATCH, MERGE, TEMPORAL = 14, 2, 2  # Qwen2.5-VL: 14-px patches, 2x2 merge windows, frames duplicated to 2
FACTOR = PATCH * MERGE  # both sides of a resized image are multiples of 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200  # Qwen2.5-VL's image processor refuses longer / shorter side over this
IMAGE_PLACEHOLDER = "<image>"
# The format instruction the paper family (EasyR1 / NoisyRollout recipes) appends to every problem.
INSTRUCTION = (" You FIRST think about the reasoning process as an internal monologue and then provide the final "
               "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
               "BE put in \\boxed{}.")


# ----------------------------------------------------------------------------- images

def smart_resize(height, width, factor=FACTOR, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """(height, width) -> (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over Qwen2.5-VL's limit of "
                         f"{MAX_ASPECT}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:  # shrink, rounding down so the area stays under the cap
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:  # grow, rounding up so the area reaches the floor
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def check_pixel_bounds(min_pixels, max_pixels):
    """Stop with one line unless smart_resize's area bounds make sense."""
    if not min_pixels >= 1:
        raise SystemExit(f"config error: min_pixels must be >= 1, got {min_pixels}")
    if not max_pixels >= min_pixels:
        raise SystemExit(f"config error: max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")


def to_rgb(image):
    """PIL image of any mode -> RGB, transparency composited onto white (as transformers does), 16-bit images
    scaled to 8 bits (PIL's own conversion clips them: a mid-grey 16-bit PNG would come out white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or values.max() > 255:  # a 32-bit "I" image holding 8-bit values stays as it is
            values = values / 257  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def load_image(image, min_pixels, max_pixels):
    """PIL image -> (3, h, w) float tensor in [0, 1] on the 1/255 grid, h and w multiples of 28."""
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.BICUBIC)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return x.permute(2, 0, 1).float() / 255


def image_to_pixels(x):
    """(3, H, W) image in [0, 1], H and W multiples of 28 -> (pixel_values, image_grid_thw), differentiable.

    pixel_values: (grid_h * grid_w, 3 * 2 * 14 * 14) patches, CLIP-normalized, ordered by 2x2 merge window;
    image_grid_thw: (1, 3) long tensor [1, grid_h, grid_w]. Same values as Qwen2VLImageProcessor.
    """
    _, H, W = x.shape
    gh, gw = H // PATCH, W // PATCH
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    x = ((x - mean) / std).unsqueeze(0).expand(TEMPORAL, 3, H, W)  # a still image is two identical frames
    x = x.reshape(TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (merge rows, merge cols, row in window, col in window, C, T, py, px)
    pixel_values = x.reshape(gh * gw, 3 * TEMPORAL * PATCH * PATCH)
    return pixel_values, torch.tensor([[1, gh, gw]], device=x.device)


def batch_pixels(images):
    """One (3, H, W) image per row -> concatenated pixel_values and (rows, 3) image_grid_thw for a batch."""
    pixels = [image_to_pixels(x) for x in images]
    return torch.cat([p for p, _ in pixels]), torch.cat([g for _, g in pixels])


def n_image_tokens(x):
    """Number of <|image_pad|> tokens the language model sees for image x: one per 2x2 window of patches."""
    return (x.shape[1] // PATCH) * (x.shape[2] // PATCH) // (MERGE * MERGE)


# ----------------------------------------------------------------------------- prompts

def build_prompt(tok, problem, n_tokens, instruction=INSTRUCTION, role="user"):
    """Problem text with one <image> placeholder -> prompt token ids (list of int) through the chat template.

    The image goes where the placeholder is (first when there is none) and its single <|image_pad|> is
    expanded to `n_tokens` copies, which is what Qwen's processor does. The format instruction follows the
    problem in the user message (role "user", the EasyR1 recipes) or is the system message (role "system", as
    NoisyRollout's evaluation asks for it).
    """
    if problem.count(IMAGE_PLACEHOLDER) > 1:
        raise ValueError(f"problem has {problem.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders; one image per problem is supported")
    before, _, after = problem.partition(IMAGE_PLACEHOLDER) if IMAGE_PLACEHOLDER in problem else ("", "", problem)
    content = [{"type": "text", "text": before.strip()}] if before.strip() else []
    content += [{"type": "image"}, {"type": "text", "text": after.strip() + (instruction if role == "user" else "")}]
    messages = [{"role": "user", "content": content}]
    if role == "system":
        messages.insert(0, {"role": "system", "content": instruction.strip()})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens, 1)
    return tok(text, add_special_tokens=False).input_ids


def prepare(record, tok, min_pixels, max_pixels, role="user"):
    """A record -> (x, prompt): its image as a (3, h, w) [0, 1] tensor and the prompt token ids that show it
    (`role`: where the format instruction goes, build_prompt's). The one way every script (training, evaluation,
    warm start) turns a problem into model inputs."""
    x = load_image(record["images"][0], min_pixels, max_pixels)
    return x, build_prompt(tok, record["problem"], n_image_tokens(x), role=role)


# ----------------------------------------------------------------------------- datasets

# Every source maps to one record shape: {"images": [PIL image], "problem": text with one "<image>" placeholder,
# "answer": str, "choices": [option texts]} -- choices is empty unless the problem is multiple choice; grading
# (rewards.is_correct) then accepts the option's letter or its text. The column names in each converter's comment
# are the `dataset_info` features of that dataset's card on the Hugging Face hub.

def _with_image(text):
    """Put the <image> placeholder first unless the text already places it (no text: check_record skips the row)."""
    return text if not isinstance(text, str) or IMAGE_PLACEHOLDER in text else IMAGE_PLACEHOLDER + text


def _as_list(images):
    """An `images` column holds a list of images; one that holds single images is read the same way."""
    return images if isinstance(images, list) else [images]


def _answer(value):
    """A stored answer as text: a missing one (None) is empty, so it is skipped as "empty answer", not graded as
    the word "None"."""
    return "" if value is None else str(value)


def _options(choices):
    """Option texts -> the lines a multiple-choice problem shows: "\\nChoices:\\n(A) ...\\n(B) ..."."""
    if not choices:
        return ""
    return "\nChoices:\n" + "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))


def _inline_choices(question):
    """Options written inside the question ("Choices:\\nA:40°\\nB:60°", or "A. 40°") -> their texts, in order.

    Returns [] unless the lines after the last "Choice" read A, B, C, ... without a gap.
    """
    found = re.findall(r"^\s*\(?([A-H])\)?\s*[:.]\s*(.+?)\s*$", question.rpartition("Choice")[2], re.MULTILINE)
    letters = "".join(letter for letter, _ in found)
    return [text for _, text in found] if found and "ABCDEFGH".startswith(letters) else []


def _problem_answer(row, prompts="question"):
    # hiyouga/geometry3k: images [Image], problem (starts with "<image>"), answer, id, choices [str], ground_truth
    # (the letter). xyliu6/k12-freeform (MMK12 in free form, as NoisyRollout trains; no card features, columns from
    # the training code that reads it): images [Image], problem, answer. Both are trained free-form: the problem
    # shows no options, so Geometry3K's `choices` are left out (a letter guessed blind would otherwise earn reward).
    return {"images": _as_list(row["images"]), "problem": _with_image(row["problem"]), "answer": _answer(row["answer"]),
            "choices": [], "meta": {}}


def _mathvista(row, prompts="question"):
    # AI4Math/MathVista: pid, question, image (a file name), decoded_image (Image), choices [str] (None when
    # free-form), unit, precision, answer (the option's text for multiple choice), question_type (multi_choice |
    # free_form), answer_type, metadata, query (the question with its answer-format hint and options, the prompt
    # the benchmark's own evaluation and NoisyRollout's use)
    choices = row["choices"] if row["question_type"] == "multi_choice" else []
    problem = row["query"] if prompts == "query" else row["question"] + _options(choices)
    return {"images": [row["decoded_image"]], "problem": _with_image(problem), "answer": row["answer"],
            "choices": choices, "meta": {}}


def _mathverse(row, prompts="question"):
    # AI4Math/MathVerse, config testmini: sample_index, problem_index, problem_version, question, image (Image),
    # answer (the letter for multi-choice), question_type (multi-choice | free-form), metadata, query_wo, query_cot
    # (the question with the benchmark's chain-of-thought instruction), question_for_eval. The options are written
    # inside `question`; in "Vision Only" everything is in the image. Scored per problem_version too (eval.py).
    question = row["question"].strip() or "Answer the question shown in the image."
    choices = _inline_choices(question) if row["question_type"] == "multi-choice" else []
    problem = row["query_cot"] if prompts == "query" else question
    return {"images": [row["image"]], "problem": _with_image(problem), "answer": row["answer"], "choices": choices,
            "meta": {"problem_version": row["problem_version"]}}


def _mathvision(row, prompts="question"):
    # MathLLMs/MathVision: id, question (may name the figure "<image1>"), options [str] (empty when free-form),
    # image (a file name), decoded_image (Image), answer (the letter for multiple choice), solution, level, subject
    question = row["question"].replace("<image1>", IMAGE_PLACEHOLDER, 1)
    return {"images": [row["decoded_image"]], "problem": _with_image(question + _options(row["options"])),
            "answer": row["answer"], "choices": row["options"], "meta": {}}


def _wemath(row, prompts="question"):
    # We-Math/We-Math, split testmini: ID, split, knowledge concept, question, option (one string, "A. 6cm; B. 8cm;
    # ..."), answer (the letter), key (which of a multi-step problem's sub-problems: "1", "2-1", ...), question
    # number, knowledge concept description, image_path (Image). Every problem is multiple choice.
    choices = [text.strip() for text in re.split(r"(?:^|;\s*)[A-H]\.\s*", row["option"].strip()) if text.strip()]
    return {"images": [row["image_path"]], "problem": _with_image(row["question"] + _options(choices)),
            "answer": row["answer"].strip(), "choices": choices, "meta": {"ID": str(row["ID"]), "key": str(row["key"])}}


HALLUSION_ASK = " Answer yes or no, as \\boxed{yes} or \\boxed{no}."  # prompts="query": the box holds one word


def _hallusionbench(row, prompts="question"):
    # lmms-lab/HallusionBench: category, subcategory, visual_input, set_id, figure_id, sample_note, question_id,
    # question, gt_answer_details, gt_answer ("1" yes, "0" no), filename, image (Image). The ids group the
    # questions for fAcc (every question about one figure right) and qAcc (one question right on every figure).
    meta = {key: str(row[key]) for key in ("category", "subcategory", "set_id", "figure_id", "question_id")}
    return {"images": [row["image"]], "problem": _with_image(row["question"] + (HALLUSION_ASK if prompts == "query" else "")),
            "answer": "yes" if row["gt_answer"] == "1" else "no", "choices": [], "meta": meta}


def _ours(row, prompts="question"):
    # a local dataset already in the record schema: images [Image] (or one image, in `images` or `image`), problem,
    # answer[, choices]
    return {"images": _as_list(row["images"] if "images" in row else row["image"]),
            "problem": _with_image(row["problem"]), "answer": _answer(row["answer"]), "choices": row.get("choices") or [],
            "meta": {}}


# name -> (hub id, config, split (None: the caller's), converter); sizes from the cards. MathVerse's text-only
# version is another config (testmini_text_only), so its testmini config holds only questions with the image.
SOURCES = {
    "geometry3k": ("hiyouga/geometry3k", None, None, _problem_answer),  # train 2,101 / validation 300 / test 601
    "mmk12": ("xyliu6/k12-freeform", None, None, _problem_answer),  # train 6,457 / mini_train 2,100 / test 808
    "mathvista": ("AI4Math/MathVista", None, "testmini", _mathvista),  # 1,000
    "mathverse": ("AI4Math/MathVerse", "testmini", "testmini", _mathverse),  # 3,940 = 5 versions of 788 with the image
    "mathvision": ("MathLLMs/MathVision", None, "test", _mathvision),  # 3,040
    "hallusionbench": ("lmms-lab/HallusionBench", None, "image", _hallusionbench),  # 951 (non_image: 178, no figure)
    "wemath": ("We-Math/We-Math", None, "testmini", _wemath),  # 1,740
}
ALIASES = {"geo3k": "geometry3k", "we-math": "wemath"}
RECORD_KEYS = ("images", "problem", "answer", "choices", "meta")


def load_records(name, split, prompts="question"):
    """Dataset -> a sequence of records (indexable, with len), images decoded only when a record is read.

    name: "synthetic" or "synthetic_score"; a SOURCES name (or alias), loaded from the hub; "name=path", a local copy of that dataset
    in its hub schema (a save_to_disk folder, a folder of parquet files or one .parquet file); or a local path
    alone, a dataset already in the record schema. `split` is ignored by the benchmarks that have one split.
    prompts: "question", each benchmark's plain question (and options), or "query", the prompt fields the
    papers' evaluations use (MathVista's query, MathVerse's query_cot, HallusionBench asked for a boxed yes/no).
    """
    check_dataset(name)
    if name in SYNTHETIC_TASKS:
        return synthetic_split(split, task=name)
    name, _, path = name.partition("=")
    name = ALIASES.get(name, name)
    if name in SOURCES:
        hub_id, config, fixed_split, convert = SOURCES[name]
        split = fixed_split or split
        if path:
            rows = _load_local(path, split, config)
        else:
            try:
                rows = datasets.load_dataset(hub_id, config, split=split)
            except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
                raise SystemExit(f"cannot load dataset '{name}' ({hub_id}, split {split}) from the hub: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; offline, pass a local "
                                 f"copy as {name}=path (a save_to_disk folder, a folder of parquet files or a "
                                 f".parquet file)") from None
    else:
        rows, convert = _load_local(name, split), _ours
    convert = functools.partial(convert, prompts=prompts)
    where = path or name
    if len(rows) == 0:
        raise SystemExit(f"dataset '{where}' (split {split}) has no rows")
    try:  # the first row tells whether the columns are the ones the converter reads
        convert(rows[0])
    except KeyError as e:
        raise SystemExit(f"dataset '{where}' has no column {e} (it has {', '.join(rows.column_names)}); "
                         f"see data.py for the columns each dataset needs") from None
    except Exception:  # a bad value (an image that does not decode...): usable_records skips it like any other row
        pass

    def transform(batch):  # datasets hands over a batch of columns; convert row by row
        records = [convert(dict(zip(batch, values))) for values in zip(*batch.values())]
        return {key: [r[key] for r in records] for key in RECORD_KEYS}
    return rows.with_transform(transform)


def check_dataset(spec):
    """Stop with one line unless `spec` names a dataset load_records can read (no data is read here)."""
    name, has_path, path = spec.partition("=")
    name = ALIASES.get(name, name)
    if has_path and name not in SOURCES:
        raise SystemExit(f"unknown dataset '{name}' in '{spec}': name=path takes one of {', '.join(SOURCES)}")
    if has_path and not os.path.exists(path):
        raise SystemExit(f"dataset path '{path}' does not exist")
    if not has_path and name not in SYNTHETIC_TASKS and name not in SOURCES and not os.path.exists(name):
        raise SystemExit(f"unknown dataset '{name}': use synthetic, synthetic_score, one of {', '.join([*SOURCES, *ALIASES])}, "
                         f"name=path/to/local/copy, or a local dataset folder or .parquet file")


def _load_local(path, split, config=None):
    """A local copy of a dataset -> the `split` rows (a one-split copy is that split, whatever its files say)."""
    if not os.path.exists(path):
        raise SystemExit(f"dataset path '{path}' does not exist")
    try:
        return _read_local(path, split, config)
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as e:  # empty or corrupt files
        cause = e.__cause__ or e
        if "corresponds to no data" in str(cause):  # how datasets says that a parquet file has no rows
            raise SystemExit(f"dataset '{path}' (split {split}) has no rows") from None
        raise SystemExit(f"cannot read dataset '{path}': {type(cause).__name__}: {str(cause).splitlines()[0]}") from None


def _read_local(path, split, config):
    """_load_local without the error messages: a parquet file, a save_to_disk folder or a folder of parquet files."""
    if os.path.isfile(path):
        return datasets.load_dataset("parquet", data_files=path, split="train")
    if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        rows = datasets.load_from_disk(path)
    else:  # parquet files; a snapshot of the hub repository also names its configs in README.md
        rows = datasets.load_dataset(path, config if config in datasets.get_dataset_config_names(path) else None)
    if isinstance(rows, datasets.Dataset):
        return rows
    if split in rows:
        return rows[split]
    if len(rows) == 1:  # e.g. a testmini.parquet that datasets names "train"
        return next(iter(rows.values()))
    raise SystemExit(f"dataset '{path}' has no split '{split}' (it has {', '.join(rows)})")


SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")


def check_record(record, tok, min_pixels, max_pixels, max_prompt_len, role="user"):
    """Why a record cannot be used, or None when it can. Everything that would fail inside the model (or
    silently teach it nothing) is caught here, before training: the image is fully decoded once."""
    images = record.get("images") or []
    if not isinstance(images, list) or not images or images[0] is None:
        return "missing image"
    if not isinstance(record.get("problem"), str):
        return "missing problem"
    if len(images) > 1 or record["problem"].count(IMAGE_PLACEHOLDER) > 1:
        return "more than one image"  # one image per problem: the pixel pipeline and the attack assume it
    if not str(record.get("answer") or "").strip():
        return "empty answer"
    if any(t in record["problem"] for t in SPECIAL_TOKENS):
        return "special token in the problem text"  # would be read as a control token (e.g. a stray image pad)
    image = images[0]
    try:
        image.load()  # a lazy PIL image only reads its pixels here: truncated or corrupt files fail now
    except Exception as e:  # PIL raises many types for broken files; the reason is printed, nothing is lost
        return f"unreadable image ({type(e).__name__})"
    if max(image.size) > MAX_ASPECT * min(image.size):
        return f"aspect ratio over {MAX_ASPECT}"
    h, w = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    n_tokens = n_image_tokens(torch.empty(0, h, w))  # only the size matters: no need to resize the image
    if len(build_prompt(tok, record["problem"], n_tokens, role=role)) > max_prompt_len:
        return f"prompt over {max_prompt_len} tokens"
    return None


def usable_records(records, tok, min_pixels, max_pixels, max_prompt_len, name="dataset", role="user"):
    """Keep the records `check_record` accepts; skip the others, never truncate, and print each reason's count.

    Grayscale, paletted and RGBA images are usable (load_image converts them, compositing alpha onto white).
    Returns (kept records, {"kept": n, "dropped": n, reason: n, ...}); a dataset with no usable row stops here.
    """
    keep, reasons = [], {}
    for i in range(len(records)):
        try:
            record = records[i]  # decoding happens on access: a corrupt stored image can fail right here
        except Exception as e:
            why = f"unreadable row ({type(e).__name__})"
        else:
            why = check_record(record, tok, min_pixels, max_pixels, max_prompt_len, role)
        if why is None:
            keep.append(i)
        else:
            reasons[why] = reasons.get(why, 0) + 1
    counts = {"kept": len(keep), "dropped": len(records) - len(keep), **reasons}
    detail = ", ".join(f"{n} {why}" for why, n in reasons.items()) or "none"
    print(f"{name}: {len(keep)} of {len(records)} rows usable; skipped: {detail}")
    if not keep:
        raise SystemExit(f"{name}: no usable row ({detail}); check the dataset path and its columns")
    kept = records.select(keep) if hasattr(records, "select") else [records[i] for i in keep]
    return kept, counts


# ----------------------------------------------------------------------------- synthetic task
# The offline demo's task: a 4x4 grid of 28-px cells, each empty or holding a red, green or
# blue square; "how many <colour> squares?". A 28-px cell is exactly one 2x2 merge window, so each cell is one
# visual token. The worked solution reads the grid row by row in <think> ("g.r. .rgr ..b. b...") and then boxes
# the count: the shipped tiny warm start reads the grid imperfectly and counts imperfectly (45% greedy), which
# leaves RL room to improve. The asked colour's count is uniform over 0..SYN_MAX_COUNT, so guessing without
# looking earns about 1 in 7.

SYN_GRID, SYN_CELL, SYN_INSET = 4, 28, 4  # 4x4 cells of 28 px (112x112 image); squares inset 4 px into each cell
SYN_MAX_COUNT = 6
SYN_COLORS = {"r": ("red", (220, 30, 30)), "g": ("green", (30, 160, 30)), "b": ("blue", (30, 60, 220))}
SYN_SIZES = {"train": 2000, "validation": 200, "test": 2000}  # the demo evaluates on the first 500
SYN_HELD_OUT = 5  # a grid belongs to one split by a hash of its content: 1/5 of all grids is held out


def _synthetic_split_of(cells, letter):
    """Which split a (grid, asked colour) belongs to. Hashing the content, not the seed, makes the splits disjoint
    by construction however many problems each draws: test = crc % 5 == 0, validation = 1, train = the rest."""
    h = zlib.crc32(f"{cells}|{letter}".encode()) % SYN_HELD_OUT
    return {0: "test", 1: "validation"}.get(h, "train")


def synthetic_image(cells):
    """16-character grid string, row by row ('.' empty, r/g/b a square) -> 112x112 RGB PIL image."""
    size = SYN_GRID * SYN_CELL
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, c in enumerate(cells):
        if c != ".":
            x0, y0 = (i % SYN_GRID) * SYN_CELL + SYN_INSET, (i // SYN_GRID) * SYN_CELL + SYN_INSET
            draw.rectangle([x0, y0, x0 + SYN_CELL - 1 - 2 * SYN_INSET, y0 + SYN_CELL - 1 - 2 * SYN_INSET],
                           fill=SYN_COLORS[c][1])
    return image


def synthetic_problem(rng, split):
    """One problem of `split` drawn from `rng` (random.Random): {images, problem, answer, solution, choices}."""
    while True:
        letter = rng.choice("rgb")
        k = rng.randint(0, SYN_MAX_COUNT)  # the asked colour's count first, so answers are uniform
        others = [c for c in "rgb." if c != letter]
        cells = [letter] * k + [rng.choice(others) for _ in range(SYN_GRID * SYN_GRID - k)]
        rng.shuffle(cells)
        cells = "".join(cells)
        if _synthetic_split_of(cells, letter) == split:
            break
    name = SYN_COLORS[letter][0]
    rows = " ".join(cells[i:i + SYN_GRID] for i in range(0, len(cells), SYN_GRID))
    return {"images": [synthetic_image(cells)], "problem": f"<image>How many {name} squares are in the grid?",
            "answer": str(k), "solution": f"<think>{rows}</think>\\boxed{{{k}}}", "choices": []}


# The collapse testbed's task ("synthetic_score"): the same grids, scored: 3 points per red square, 1 per blue one,
# green none. The answer (0..32, 33 values: a uniform guesser's pass@12 is 0.31) follows from the reasoning: the
# worked solution states the red and blue counts, in either order (both are right: a choice RL can collapse), then
# the arithmetic:
#   <think>red3 blue2 3*3+2=11</think>\boxed{11}      or      <think>blue2 red3 2+3*3=11</think>\boxed{11}
# so a policy's boxed answer can be checked against its own counts (score_consistent). The counts are what the
# tiny model can see (it cannot read a grid cell by cell), so their digits are the tokens whose uncertainty
# decides the answer, and the ones GRPO's sharpening should make sure.
SCORE_POINTS = {"r": 3, "b": 1}
SCORE_MAX_EACH = 8  # at most this many red and this many blue squares (each count uniform over 0..8)
SCORE_COUNT = re.compile(r"(red|blue)(\d)")


def score_problem(rng, split):
    """One "synthetic_score" problem of `split` from `rng`: {images, problem, answer, solution, choices}."""
    while True:
        n_red, n_blue = rng.randint(0, SCORE_MAX_EACH), rng.randint(0, SCORE_MAX_EACH)
        cells = ["r"] * n_red + ["b"] * n_blue + [rng.choice("g.") for _ in range(SYN_GRID ** 2 - n_red - n_blue)]
        rng.shuffle(cells)
        cells = "".join(cells)
        if _synthetic_split_of(cells, "score") == split:
            break
    score, per_red = SCORE_POINTS["r"] * n_red + SCORE_POINTS["b"] * n_blue, SCORE_POINTS["r"]
    if rng.random() < 0.5:
        work = f"red{n_red} blue{n_blue} {per_red}*{n_red}+{n_blue}={score}"
    else:
        work = f"blue{n_blue} red{n_red} {n_blue}+{per_red}*{n_red}={score}"
    return {"images": [synthetic_image(cells)], "answer": str(score), "solution": f"<think>{work}</think>\\boxed{{{score}}}",
            "choices": [],
            "problem": "<image>Each red square scores 3, each blue square 1, a green square 0. What is the grid's score?"}


def score_consistent(response):
    """Does a "synthetic_score" response's boxed answer follow from its own counts? -> bool.

    True when its <think> states one red and one blue count (in either order) and it boxes 3 * red + blue,
    whatever arithmetic it wrote on the way; False otherwise (a count missing or repeated, no box)."""
    counts = SCORE_COUNT.findall(response.split("</think>")[0])
    boxed = re.findall(r"\\boxed\{\s*(\d+)\s*\}", response)
    said = dict(counts)
    if len(counts) != 2 or len(said) != 2 or not boxed:
        return False
    return boxed[-1] == str(SCORE_POINTS["r"] * int(said["red"]) + SCORE_POINTS["b"] * int(said["blue"]))


def score_counts(response):
    """Character positions of the count digits a "synthetic_score" response states in its <think> (the digit after
    "red" and after "blue"): the tokens that carry its uncertainty about the grid, with the character-level
    tokenizer of the tiny models (token j is character j). -> list of int"""
    return [m.start(2) for m in SCORE_COUNT.finditer(response.split("</think>")[0])]


SYNTHETIC_TASKS = {"synthetic": synthetic_problem, "synthetic_score": score_problem}


def synthetic_stream(split, seed=0, task="synthetic"):
    """Endless problems of `split` (train | validation | test) of a SYNTHETIC_TASKS task, deterministic in
    (task, split, seed)."""
    if split not in SYN_SIZES:
        raise SystemExit(f"synthetic task has no split '{split}': use one of {', '.join(SYN_SIZES)}")
    rng = random.Random(f"{task}/{split}/{seed}")  # a string seed: each task and split its own stream
    while True:
        yield SYNTHETIC_TASKS[task](rng, split)


def synthetic_split(split, n=None, seed=0, task="synthetic"):
    """The first n problems (default: SYN_SIZES[split]) of synthetic_stream(split, seed, task), as a list of records."""
    stream = synthetic_stream(split, seed, task)
    return list(itertools.islice(stream, SYN_SIZES[split] if n is None else n))

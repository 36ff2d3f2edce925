"""Images and text -> model inputs, and the datasets they come from.

One pixel pipeline (DESIGN §5): `load_image` resizes once in PIL, outside autograd, to a size `smart_resize`
picks; `image_to_pixels` does everything after that as a differentiable torch function of the [0, 1] image,
so the clean rollouts, the EgAS attack and the policy update all see the image the same way, and gradients
reach the raw pixels. A test holds it equal to transformers' Qwen2-VL image processor.
"""
import math

import torch
from PIL import Image

PATCH, MERGE, TEMPORAL = 14, 2, 2  # Qwen2.5-VL: 14-px patches, 2x2 merge windows, frames duplicated to 2
FACTOR = PATCH * MERGE  # both sides of a resized image are multiples of 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PLACEHOLDER = "<image>"
# The format instruction the paper family (EasyR1 / NoisyRollout recipes) appends to every problem.
INSTRUCTION = (" You FIRST think about the reasoning process as an internal monologue and then provide the final "
               "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
               "BE put in \\boxed{}.")


# ----------------------------------------------------------------------------- images

def smart_resize(height, width, factor=FACTOR, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """(height, width) -> (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over Qwen2.5-VL's limit of 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:  # shrink, rounding down so the area stays under the cap
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:  # grow, rounding up so the area reaches the floor
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def to_rgb(image):
    """PIL image of any mode -> RGB, transparency composited onto white (as transformers does)."""
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


def n_image_tokens(x):
    """Number of <|image_pad|> tokens the language model sees for image x: one per 2x2 window of patches."""
    return (x.shape[1] // PATCH) * (x.shape[2] // PATCH) // (MERGE * MERGE)


# ----------------------------------------------------------------------------- prompts

def build_prompt(tok, problem, n_tokens, instruction=INSTRUCTION):
    """Problem text with one <image> placeholder -> prompt token ids (list of int) through the chat template.

    The image goes where the placeholder is (first when there is none) and its single <|image_pad|> is
    expanded to `n_tokens` copies, which is what Qwen's processor does.
    """
    if problem.count(IMAGE_PLACEHOLDER) > 1:
        raise ValueError(f"problem has {problem.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders; one image per problem is supported")
    before, _, after = problem.partition(IMAGE_PLACEHOLDER) if IMAGE_PLACEHOLDER in problem else ("", "", problem)
    content = [{"type": "text", "text": before.strip()}] if before.strip() else []
    content += [{"type": "image"}, {"type": "text", "text": after.strip() + instruction}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens, 1)
    return tok(text, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- datasets

def load_records(name, split):
    """Dataset name or local path -> a sequence of records {images: [PIL], problem, answer[, choices]}."""
    import os
    import datasets
    if name == "synthetic":
        return synthetic_split(split)
    if name == "geometry3k":
        return datasets.load_dataset("hiyouga/geometry3k", split=split)
    if os.path.isfile(name) and name.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=name, split="train")
    if os.path.isdir(name):
        return datasets.load_dataset(name, split=split)
    raise SystemExit(f"unknown dataset '{name}': use synthetic, geometry3k, a .parquet file or a local dataset folder")

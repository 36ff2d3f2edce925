"""Which network: load a Qwen2.5-VL policy and its tokenizer by short name or path, or build the tiny offline one.

`load_policy("Qwen2.5-VL-3B")` resolves to the official instruct checkpoint on the Hugging Face hub,
`load_policy("path/to/checkpoint")` loads a local save, and `load_policy("tiny")` builds a ~1M-parameter
Qwen2.5-VL (the real `Qwen2_5_VLForConditionalGeneration` class) with a character-level tokenizer, so the
demo and the tests run on a laptop with no network. This file also holds the one forward pass everything
else uses (`response_hidden`, the last hidden states that predict each response token; `shared_prompt_hidden`,
the same with the prompt encoded once) and the one LM head on top of it (`token_logprobs`: each response token's
log-prob and the entropy of its next-token distribution, chunked, never storing the vocabulary-wide logits).
"""
import json
import math
import os
import string
import struct

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch.distributed.fsdp import FSDPModule
from transformers import (AutoTokenizer, DynamicCache, GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)
from transformers.cache_utils import DynamicLayer

import data

HUB_MODELS = {  # short name -> official instruct checkpoint
    "Qwen2.5-VL-3B": "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen2.5-VL-7B": "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen2.5-VL-32B": "Qwen/Qwen2.5-VL-32B-Instruct",
}
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL's chat layout, written as a jinja template for the tiny tokenizer (the hub tokenizers ship their own).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer with Qwen2.5-VL's special tokens and chat layout (vocab 103)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + VISION_TOKENS
    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(tok, text_layers=4, text_hidden=128, vision_depth=2, vision_hidden=64):
    """A Qwen2.5-VL config with the real architecture at toy size (1.27M parameters at the defaults)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    half_head = text_hidden // 4 // 2  # multimodal rope splits each head's rotary half into (time, height, width)
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                         "mrope_section": [half_head // 4, 3 * half_head // 8, 3 * half_head // 8]},
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=4, out_hidden_size=text_hidden, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


class PatchProjection(torch.nn.Module):
    """Qwen2.5-VL's patch embedding, a Conv3d whose kernel equals its stride, written as the matmul it is.

    Each patch (C, T, P, P) meets the kernel exactly once, so the convolution is `patches @ W.view(D, -1).T`.
    The weight keeps the Conv3d's name and shape (D, C, T, P, P): checkpoints load and save unchanged. Why: on
    CPU the Conv3d's backward to its input (the attack's path to the pixels) is ~30x slower than the matmul's
    (256 patches of the tiny model: 57 ms against 1.6 ms). patches: (N, C, T, P, P) -> (N, D)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight  # the Conv3d's own Parameter: the optimizer, FSDP and state dicts see the same one

    def forward(self, patches):
        return F.linear(patches.flatten(1), self.weight.flatten(1))


def use_patch_projection(model):
    """Swap the vision tower's patch-embedding Conv3d for PatchProjection (same weight, same outputs up to float
    rounding). Every model this project builds or loads goes through here, before it is sharded or trained."""
    embed = model.model.visual.patch_embed
    if isinstance(embed.proj, torch.nn.Conv3d):
        assert embed.proj.kernel_size == embed.proj.stride and embed.proj.bias is None, "not a patchify Conv3d"
        embed.proj = PatchProjection(embed.proj.weight)
    return model


def build_tiny(seed=0, text_layers=4, text_hidden=128, vision_depth=2, vision_hidden=64, vocab_size=None):
    """A random tiny Qwen2.5-VL (the real class, `tiny_config` sizes) from `seed`, and its tokenizer. `vocab_size`
    widens the LM head and embeddings (ids past the tokenizer's 103 decode to nothing): Qwen's real vocabulary on
    a small model, for measuring what the 152k-token LM head costs."""
    tok = tiny_tokenizer()
    config = tiny_config(tok, text_layers, text_hidden, vision_depth, vision_hidden)
    if vocab_size:
        config.text_config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = use_patch_projection(Qwen2_5_VLForConditionalGeneration(config))
    model.generation_config = GenerationConfig()  # sampling settings are sample()'s alone (see load_policy)
    return model, tok


def check_device(device):
    """Stop with one line unless this machine can compute on `device` (cpu, cuda, cuda:N, mps)."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"config error: device {device!r} is not a torch device (cpu, cuda, cuda:0, ...)") from None
    usable = {"cpu": True, "mps": torch.backends.mps.is_available(),
              "cuda": torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()}
    if not usable.get(d.type, False):
        raise SystemExit(f"config error: device {device!r} is not available on this machine "
                         f"({torch.cuda.device_count()} CUDA device(s)); use --device=cpu")


def load_policy(name, dtype=torch.float32, device="cpu", seed=0, device_map=None):
    """Short name, hub id or local path -> (model, tokenizer). 'tiny' builds a random tiny model from `seed`.
    device_map="auto" (evaluation of a model too big for one GPU) lets transformers and accelerate spread the
    layers over every visible GPU (and the CPU) instead of moving it all to `device`."""
    if name == "tiny":
        model, tok = build_tiny(seed)
        return model.to(device=device, dtype=dtype), tok
    local = os.path.isdir(name)
    if name in HUB_MODELS:
        name = HUB_MODELS[name]
    elif local:
        check_model_folder(name)  # before transformers, which builds a default (72B-sized) config without one
    elif "/" not in name:
        raise SystemExit(f"unknown model '{name}': use one of {['tiny'] + list(HUB_MODELS)}, a hub id, or a local path")
    elif name.startswith((".", "/")) or os.sep in name and not name.count("/") == 1:
        raise SystemExit(f"model path '{name}' does not exist: check the path, or pass a hub id like Qwen/Qwen2.5-VL-3B-Instruct")
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, dtype=dtype, attn_implementation="sdpa",
                                                                   device_map=device_map or None)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        if local:
            raise SystemExit(f"cannot load model folder '{name}': {e}") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        fix = ("unset HF_HUB_OFFLINE or download it first, then pass the local path" if offline
               else "check the name, your network, or pass a local path")
        raise SystemExit(f"cannot load model '{name}' ({type(e).__name__}): {fix}") from None
    # A checkpoint's generation_config.json (Qwen's instruct ships repetition_penalty 1.05, top_k 1, top_p 0.001)
    # would leak into every `generate` call; rollouts must be drawn from softmax(logits / T) exactly, as the
    # log-probs, the entropies and the ratio of the update assume. sample() states every setting it needs.
    model.generation_config = GenerationConfig()
    model = use_patch_projection(model)
    return (model if device_map else model.to(device)), tok


def check_model_folder(path):
    """Stop with one line naming the folder and the file when a local model folder cannot load: a missing or
    corrupt config.json, missing or truncated weights, or no tokenizer files."""
    def fail(why):
        raise SystemExit(f"model folder '{path}': {why}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        fail("no config.json (is this a model folder? a checkpoint saved by train.py holds one)")
    try:
        model_type = json.load(open(config)).get("model_type")
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"config.json is not valid JSON ({e})")
    if model_type not in ("qwen2_5_vl", "qwen2_vl"):
        fail(f"config.json has model_type {model_type!r}, not a Qwen2.5-VL model")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            shards = sorted(set(json.load(open(index))["weight_map"].values()))
        except (ValueError, KeyError) as e:
            fail(f"model.safetensors.index.json is corrupt ({type(e).__name__})")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        fail("no weights (model.safetensors or model.safetensors.index.json)")
    for shard in shards:  # a safetensors file states its own length: an 8-byte header size, a JSON header, data
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            fail(f"weight file {shard} is missing")
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            data_len = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError):
            fail(f"weight file {shard} is corrupt (unreadable safetensors header)")
        if size < 8 + header_len + data_len:
            fail(f"weight file {shard} is truncated ({size:,} of {8 + header_len + data_len:,} bytes)")
    has = lambda f: os.path.isfile(os.path.join(path, f))
    if not has("tokenizer_config.json") or not (has("tokenizer.json") or has("vocab.json") and has("merges.txt")):
        fail("no tokenizer files (tokenizer_config.json with tokenizer.json, or vocab.json and merges.txt)")


def vision_token_ids(tok):
    """Token ids the policy must never generate: fed back, a sampled <|image_pad|> crashes the vision merge
    ("Image features and image tokens do not match")."""
    return [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS]


def response_hidden(model, input_ids, attention_mask, pixel_values, image_grid_thw, prompt_len):
    """Final hidden states at the positions that predict each response token.

    input_ids, attention_mask: (B, P + L), prompt left-padded to length P, response right-padded to L.
    pixel_values: (sum of patches over rows, 1176); image_grid_thw: (B, 3), one image per row.
    Returns (B, L, D): row b, column t is the state after reading token P + t - 1, which predicts token P + t.
    The call goes through the top-level module (so FSDP's hooks gather the weights) with logits_to_keep=1,
    so the (B, P + L, vocab) logits are never built; a hook on the final norm catches the hidden states.
    """
    captured = []
    hook = model.model.language_model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
              image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_types(model, input_ids), use_cache=False,
              logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1][:, prompt_len - 1:-1]


def shared_prompt_hidden(model, sequences, attention_mask, pixel_values, image_grid_thw, prompt_len, n=None):
    """response_hidden for k prompts with n responses each, encoding each prompt (and its image) once.

    sequences, attention_mask: (k * n, P + L), rows i * n ... i * n + n - 1 sharing prompt i (left-padded to P);
    pixel_values, image_grid_thw: the k images (data.batch_pixels). n: responses per prompt (None: all rows share
    one prompt). Returns (k * n, L, D), equal to response_hidden on the rows with each image repeated n times.
    Each prompt's keys and values are computed once and repeated; gradients reach the pixels through them.
    Costs k * P + k * n * L tokens instead of k * n * (P + L), and k vision-tower images instead of k * n.
    """
    rows = sequences.shape[0]
    n = n or rows
    prompts = sequences[::n, :prompt_len]  # (k, P)
    if not (sequences[:, :prompt_len] == prompts.repeat_interleave(n, 0)).all():
        raise ValueError(f"shared_prompt_hidden: each run of {n} rows must share one prompt")
    # under activation checkpointing transformers drops the KV cache in training: encode every row (a no-grad pass,
    # such as pi_old's log-probs, needs no checkpointing and shares the prompt)
    if model.training and model.is_activation_checkpointing and torch.is_grad_enabled():
        per_image = pixel_values.split(image_grid_thw.prod(-1).tolist())
        return response_hidden(model, sequences, attention_mask, torch.cat([p.repeat(n, 1) for p in per_image]),
                               image_grid_thw.repeat_interleave(n, 0), prompt_len)
    # Qwen2.5-VL's 3D (time, height, width) positions of the whole sequences, computed as one forward would
    positions = multimodal_positions(model, sequences, attention_mask, image_grid_thw.repeat_interleave(n, 0))
    captured = []
    hook = model.model.language_model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        out = model(input_ids=prompts, attention_mask=attention_mask[::n, :prompt_len], pixel_values=pixel_values,
                    image_grid_thw=image_grid_thw, position_ids=positions[:, ::n, :prompt_len], use_cache=True,
                    logits_to_keep=1)
        cache = out.cache
        cache.batch_repeat_interleave(n)  # each prompt's keys/values, one copy per response
        model(input_ids=sequences[:, prompt_len:], attention_mask=attention_mask, cache=cache,
              position_ids=positions[:, :, prompt_len:], use_cache=True, logits_to_keep=1)
    finally:
        hook.remove()
    prompt_states, response_states = captured
    # the last prompt state predicts response token 0; response state t - 1 predicts token t
    return torch.cat([prompt_states[:, -1:].repeat_interleave(n, 0), response_states[:, :-1]], 1)


def entropy_from_logp(logp):
    """The entropy formula: (..., V) log-probs -> (...) entropy in nats, H = -sum_v p_v log p_v, with 0 log 0 = 0
    (suppressed tokens, at -inf, count for nothing). Differentiable. (_HeadLogpEntropy writes the same formula
    in place, to hold one (n, V) tensor fewer in the memory-critical LM head.)"""
    return torch.special.entr(logp.exp()).sum(-1)


def _scaled_logits(h, weight, temperature):
    """(n, D), (V, D) -> (n, V) fp32 logits / T, divided in place (no second (n, V) tensor).

    The product runs in the weight's dtype (bf16 under FSDP2's compute weights, where autocast is off), the softmax
    that follows in fp32."""
    logits = (h.to(weight.dtype) @ weight.T).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


class _HeadLogpEntropy(torch.autograd.Function):
    """Target log-prob and entropy of softmax(h W^T / T) for one chunk of positions, never storing the logits.

    h: (n, D), weight: (V, D), targets: (n,) -> logp, entropy: (n,) fp32. Like activation checkpointing, backward
    recomputes the (n, V) logits; unlike it, the gradient is written in closed form into one buffer, so a chunk
    costs 2 (n, V) fp32 tensors at peak (autograd through log_softmax, exp and the product would keep ~5).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature):
        # same autocast (bf16 matmul on GPU) in the recomputation as here, so backward sees identical logits
        ctx.autocast = (torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type))
        logp_all = torch.log_softmax(_scaled_logits(h, weight, temperature), dim=-1)  # (n, V)
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -logp_all.exp().mul_(logp_all).sum(-1)  # entropy_from_logp, in place: H = -sum_v p_v log p_v
        ctx.save_for_backward(h, weight, targets, entropy)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, targets, entropy = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
            logp_all = torch.log_softmax(_scaled_logits(h, weight, ctx.temperature), dim=-1)
            p = logp_all.exp()
            # dH/dz = -p * (log p + H);  d log p_t / dz = onehot(t) - p;  z = logits / T
            grad_z = logp_all.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])  # reuses logp_all's memory
            grad_z.sub_(p.mul_(grad_logp[:, None]))
            grad_z.scatter_add_(-1, targets[:, None], grad_logp[:, None]).div_(ctx.temperature)
            del p
            # grad_z is fp32; the two products run in the weight's dtype, as the forward's did (with autocast on,
            # it casts by itself; FSDP2's bf16 compute weights run with autocast off), and the gradients come
            # back in the dtypes of h and weight
            grad_z = grad_z.to(weight.dtype)
            grad_h = (grad_z @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (grad_z.T @ h.to(weight.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def token_logprobs(hidden, lm_head, targets, mask, temperature=1.0, chunk_size=1024):
    """Log-prob of each response token and the entropy of its next-token distribution, chunk by chunk.

    hidden: (B, L, D) states predicting each response token (model.response_hidden); targets, mask: (B, L).
    lm_head: the LM head module, or its (V, D) weight (pass a detached weight when only `hidden` needs a gradient,
    as in the attack: then no weight gradient is computed). Returns logp, entropy: (B, L) fp32, zero where mask is 0.
    Only masked positions are pushed through the LM head, `chunk_size` at a time, and the (chunk, vocab) logits are
    recomputed in backward instead of stored: memory grows with the response length times D, not times V.
    """
    weight = lm_head.weight if isinstance(lm_head, torch.nn.Module) else lm_head
    mask = mask.bool()
    h, t = hidden[mask], targets[mask]  # (N, D), (N,): padding never reaches the LM head
    logp_parts, ent_parts = [], []
    for i in range(0, h.shape[0], chunk_size):
        lp, ent = _HeadLogpEntropy.apply(h[i:i + chunk_size], weight, t[i:i + chunk_size], temperature)
        logp_parts.append(lp)
        ent_parts.append(ent)
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(mask.shape, dtype=torch.float32)
    if logp_parts:
        logp = logp.masked_scatter(mask, torch.cat(logp_parts))
        entropy = entropy.masked_scatter(mask, torch.cat(ent_parts))
    return logp, entropy


def sequences(rollouts, rows):
    """Prompt + response rows -> (input_ids, attention_mask) of shape (B, P + L) and the (B, L) response mask."""
    ids = torch.cat([rollouts["prompt_ids"][rows], rollouts["response_ids"][rows]], 1)
    attn = torch.cat([rollouts["prompt_mask"][rows], rollouts["response_mask"][rows]], 1)
    return ids, attn, rollouts["response_mask"][rows]


def trimmed_sequences(rollouts, rows):
    """Rows of one prompt, cut to its own left padding and its longest response: the same result at the cost of its
    own tokens. -> ids, attention_mask (m, p + w), response_mask (m, w), and p, the prompt's length."""
    ids, attn, resp_mask = sequences(rollouts, rows)
    P = rollouts["prompt_ids"].shape[1]
    pad = int((attn[0, :P] == 0).sum())
    width = max(1, int(resp_mask.sum(1).max()))
    return ids[:, pad:P + width], attn[:, pad:P + width], resp_mask[:, :width], P - pad


def mm_token_types(model, input_ids):
    """(B, T) 1 at image tokens, 0 at text: transformers needs it to give image tokens their 3D (time, height,
    width) rotary positions; without it every token gets a plain text position, wrong for a pretrained Qwen."""
    return (input_ids == model.config.image_token_id).int()


def multimodal_positions(model, input_ids, attention_mask, image_grid_thw):
    """(B, T) sequences with their images -> (3, B, T) rotary positions, exactly as a forward pass computes them."""
    positions, _ = model.model.get_rope_index(input_ids, mm_token_types(model, input_ids), image_grid_thw=image_grid_thw,
                                              attention_mask=attention_mask)
    return positions


def gather_weights(model):
    """Under FSDP2, gather every layer's weights and hold them until `release_weights` (no-op for a plain model).

    FSDP2 reshards each non-root group after its forward and backward, so a `generate` call would all-gather every
    layer again for every token (at 7B, ~13 GB over the interconnect per token); held, each layer is gathered once.
    Returns the sharded modules, [] for a plain model.
    """
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        if m is not model:  # FSDP2 never reshards the root after forward; leave it so
            m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()
    return sharded


def release_weights(sharded):
    """Undo `gather_weights`: reshard after each forward and backward again, and drop the gathered weights now."""
    for m in sharded:
        if m is not sharded[0]:  # sharded[0] is the root (model.modules() lists it first)
            m.set_reshard_after_forward(True, recurse=False)
        m.set_reshard_after_backward(True, recurse=False)
        m.reshard()


def stop_token_ids(tok):
    """Tokens that end a response: <|im_end|> and <|endoftext|> (Qwen's generation config stops on both)."""
    return sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})


class GrowingLayer(DynamicLayer):
    """One layer's KV cache for decoding: the keys and values live in buffers allocated once for the whole response,
    and each new token is written in place (a DynamicLayer concatenates, copying the whole cache every token).
    keys, values: (B, H, T, d) the prompt's; capacity: the most positions it will ever hold. `keep` drops finished
    rows, so the attention of the rows still decoding stops paying for them."""

    def __init__(self, keys, values, capacity):
        super().__init__()
        self.device, self.is_initialized, self.length = keys.device, True, keys.shape[2]
        self.key_buffer = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
        self.value_buffer = values.new_empty(*values.shape[:2], capacity, values.shape[3])
        self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length] = keys, values
        self._views()

    def _views(self):
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[2]
        self.key_buffer[:, :, self.length:end], self.value_buffer[:, :, self.length:end] = key_states, value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def keep(self, keep):
        """keep: (rows,) bool, which of the current rows stay."""
        self.key_buffer, self.value_buffer = self.key_buffer[keep], self.value_buffer[keep]
        self._views()


def left_pad(prompts, pad_id):
    """Token-id lists -> (ids, mask) of shape (len(prompts), P), left-padded to the longest prompt P."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    return ids, mask


@torch.no_grad()
def decode(model, tok, prompt_ids, prompt_mask, images, n, max_new_tokens, temperature=1.0, greedy=False):
    """Sample n responses to each of k prompts, encoding each prompt (and its image) once.

    prompt_ids, prompt_mask: (k, P) left-padded; images: k (3, H, W) tensors in [0, 1]. This is what
    `model.generate` does with the prompts repeated n times and `sampling_config`'s settings (the tests hold the
    two equal), minus its costs on a small model: the k prompts are encoded once and their keys/values repeated
    for the n responses (generate encodes each prompt n times), the cache grows in place (GrowingLayer), and the
    per-token work is one forward and one draw from softmax(logits / T). Each token is drawn from the whole
    vocabulary with the vision tokens suppressed (feeding one back would crash the vision merge).
    Returns response_ids (k * n, L) (padding after a row's stop token) and response_entropy (k * n, L): the
    entropy of the distribution each token was drawn from. Row i * n + j is prompt i's j-th response.
    """
    k, P = prompt_ids.shape
    pixel_values, grid = data.batch_pixels(images)
    positions = multimodal_positions(model, prompt_ids, prompt_mask, grid)  # (3, k, P), as a forward computes them
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, pixel_values=pixel_values, image_grid_thw=grid,
                position_ids=positions, use_cache=True, logits_to_keep=1)
    capacity = P + max_new_tokens
    cache = DynamicCache()
    cache.layers = [GrowingLayer(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0), capacity)
                    for layer in out.cache.layers]
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # (B, V)
    next_position = positions.amax(dim=(0, 2)).repeat_interleave(n) + 1  # (B,) text positions go on from the prompt's
    mask = torch.ones(k * n, capacity, dtype=torch.long, device=prompt_ids.device)
    mask[:, :P] = prompt_mask.repeat_interleave(n, 0)
    suppressed = torch.tensor(vision_token_ids(tok), device=logits.device)
    stops = torch.tensor(stop_token_ids(tok), device=logits.device)
    running = torch.ones(k * n, dtype=torch.bool, device=logits.device)
    batch = torch.arange(k * n, device=logits.device)  # the rows the model still runs on
    tokens, entropies = [], []
    for t in range(max_new_tokens):
        logits[:, suppressed] = -math.inf
        probs = torch.softmax(logits / temperature if temperature != 1.0 and not greedy else logits, dim=-1)
        # every row draws, finished ones too: the random numbers used are those generate would use
        token = logits.argmax(-1) if greedy else torch.multinomial(probs, num_samples=1).squeeze(1)
        token = torch.where(running, token, tok.pad_token_id)  # after its stop token a row gets padding
        tokens.append(token)
        entropies.append(torch.special.entr(probs).sum(-1) * running)
        running &= ~torch.isin(token, stops)
        if not running.any() or t == max_new_tokens - 1:
            break
        keep = running[batch]
        if keep.sum() <= 3 * len(batch) // 4:  # a quarter of the batch has finished: stop computing it
            batch = batch[keep]
            for layer in cache.layers:
                layer.keep(keep)
        position = (next_position[batch] + t).view(1, -1, 1).expand(3, -1, 1)
        logits[batch] = model(input_ids=token[batch, None], attention_mask=mask[batch, :P + t + 1], cache=cache,
                              position_ids=position, use_cache=True).logits[:, -1].float()
    return torch.stack(tokens, 1), torch.stack(entropies, 1)


def sampling_config(tok, max_new_tokens, temperature=1.0, greedy=False):
    """What `decode` does, as the GenerationConfig that makes `model.generate` do the same: sampling from
    softmax(logits / T) over the whole vocabulary (or its argmax), the vision tokens suppressed, stopping at our
    stop tokens -- nothing else changes the scores. The tests hold `decode` equal to generate with it."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=1.0 if greedy else temperature,
        top_k=None if greedy else 0,  # greedy: any top_k draws transformers' "flag not valid" warning
        top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
        min_new_tokens=0, num_beams=1, num_return_sequences=1, renormalize_logits=False,
        suppress_tokens=vision_token_ids(tok), eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)


def arch(config):
    """A Qwen2.5-VL config -> the sizes the memory formulas below need (bench.ARCHS holds the published ones)."""
    text, vision = config.text_config, config.vision_config
    return dict(vocab=text.vocab_size, hidden=text.hidden_size, intermediate=text.intermediate_size,
                layers=text.num_hidden_layers, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                tied=bool(config.tie_word_embeddings), v_depth=vision.depth, v_hidden=vision.hidden_size,
                v_intermediate=vision.intermediate_size)


def decode_bytes(a, prompt_len, new_tokens, n, patches, key_bytes=2, value_bytes=2, compute_bytes=2):
    """Memory in bytes that one prompt adds to a `decode` call: its n rows' KV cache, allocated at full length
    (prompt_len + new_tokens) up front, plus the prompt's own cache they are copied from; each row's fp32 logits and
    the three (rows, V) temporaries of drawing a token (logits / T, softmax, entropy); the prefill's largest layer
    temporaries over the prompt (q, k, v, attention output and the MLP's gate, up and product); and the vision
    tower's over the image's `patches` (qkv, attention output, MLP), each layer's freed before the next. The phases
    do not all peak at once, so the sum is an upper bound. a: arch(config) or bench.ARCHS[name]. Under autocast the
    cached keys are fp32 (the rotary embedding runs in fp32) and the values bf16: key_bytes=4, value_bytes=2."""
    kv_dim = a["hidden"] // a["heads"] * a["kv_heads"]
    per_position = a["layers"] * kv_dim * (key_bytes + value_bytes)
    cache = per_position * ((prompt_len + new_tokens) * n + prompt_len)
    logits = 4 * n * a["vocab"] * 4
    prefill = compute_bytes * prompt_len * (3 * a["hidden"] + 3 * kv_dim + 3 * a["intermediate"])
    vision = compute_bytes * patches * (5 * a["v_hidden"] + 3 * a["v_intermediate"])
    return cache + logits + prefill + vision


SAMPLING_MEMORY = 0.9  # the share of the free CUDA memory one sampling call may fill (the rest: fragmentation)


def free_cuda_bytes(device):
    """What the CUDA device can still hand out: its free memory plus what PyTorch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def prompts_per_call(model, prompt_len, new_tokens, n, patches, budget):
    """How many prompts (of n responses each) one `decode` call takes within `budget` bytes, by decode_bytes: at
    least 1. The cache's dtypes are read off the path: fp32 keys under autocast, else the weights' dtype."""
    device = next(model.parameters()).device
    if torch.is_autocast_enabled(device.type):
        key_bytes, value_bytes = 4, torch.get_autocast_dtype(device.type).itemsize
    else:
        key_bytes = value_bytes = next(model.parameters()).dtype.itemsize  # fp32 shards under FSDP2: on the safe side
    per_prompt = decode_bytes(arch(model.config), prompt_len, new_tokens, n, patches, key_bytes, value_bytes,
                              compute_bytes=value_bytes)
    return max(1, int(budget // per_prompt))


@torch.no_grad()
def sample(model, tok, prompts, images, n, max_new_tokens, temperature=1.0, greedy=False, chunk_rows=0):
    """Sample n responses for each prompt, in `decode` calls of at most `chunk_rows` responses (a call holds whole
    prompts, so at least n): the KV cache grows with the rows of a call, so the chunk bounds sampling memory.
    chunk_rows=0: on CUDA, as many prompts as SAMPLING_MEMORY of the free memory holds by `decode_bytes` (measured once the
    weights are gathered); elsewhere all of them in one call.

    prompts: list of token-id lists; images: list of (3, H, W) tensors in [0, 1], one per prompt (an adversarial
    image simply replaces the clean one). Rows are laid out prompt by prompt: row i * n + j is prompt i's j-th
    response. Returns a dict of tensors:
      prompt_ids, prompt_mask: (B, P) left-padded; response_ids, response_mask: (B, L) right-padded, each
      response kept up to and including its first stop token; truncated: (B,) bool, no stop token within
      max_new_tokens; response_entropy: (B, L) fp32, the entropy of each token's sampling distribution (0 on padding).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, tok.pad_token_id))
    # under FSDP2, gather the weights once for the whole rollout rather than once per token. While they are
    # held, a forward makes no collective call, so each rank decodes until its own responses are done.
    sharded = gather_weights(model)
    ids_parts, entropy_parts = [], []
    try:
        per_call = max(1, chunk_rows // n) if chunk_rows else len(prompts)  # prompts per decode call
        if not chunk_rows and device.type == "cuda":
            patches = max(x.shape[-2] * x.shape[-1] for x in images) // data.PATCH ** 2
            per_call = prompts_per_call(model, prompt_ids.shape[1], max_new_tokens, n, patches,
                                        budget=SAMPLING_MEMORY * free_cuda_bytes(device))
        for first in range(0, len(prompts), per_call):
            rows = slice(first, first + per_call)
            ids, entropy = decode(model, tok, prompt_ids[rows], prompt_mask[rows], [x.to(device) for x in images[rows]],
                                  n, max_new_tokens, temperature, greedy)
            ids_parts.append(ids)
            entropy_parts.append(entropy)
    finally:
        release_weights(sharded)
    L = max(part.shape[1] for part in ids_parts)  # calls end at different lengths: right-pad them to one
    response_ids = torch.cat([F.pad(part, (0, L - part.shape[1]), value=tok.pad_token_id) for part in ids_parts])
    entropy = torch.cat([F.pad(part, (0, L - part.shape[1])) for part in entropy_parts])
    is_stop = torch.isin(response_ids, torch.tensor(stop_token_ids(tok), device=device))
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # positions strictly after the first stop token
    response_mask = (~after_stop).long()
    response_ids = response_ids.masked_fill(after_stop, tok.pad_token_id)
    return {"prompt_ids": prompt_ids.repeat_interleave(n, 0), "prompt_mask": prompt_mask.repeat_interleave(n, 0),
            "response_ids": response_ids, "response_mask": response_mask, "truncated": ~is_stop.any(1),
            "response_entropy": entropy * response_mask}

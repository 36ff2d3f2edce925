"""How a run scales out: torchrun's process group, FSDP2 sharding, loading on rank 0, collectives.

`torchrun --nproc_per_node=8 train.py ...` starts one process per GPU. Each joins the process group
(`setup_distributed`), rank 0 alone reads the weights (`load_on_rank0`) and FSDP2 shards them, one group per
decoder layer and per vision block (`shard`). Every rank samples its own prompts; losses, counts and metrics are
summed over ranks (`all_reduce_sum`, `global_mean`), so every number means the same on 1 GPU or 64. Without
torchrun every function here is a no-op or the plain single-process path.
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from model import Qwen2_5_VLForConditionalGeneration, load_policy, use_patch_projection

LOAD_TIMEOUT = datetime.timedelta(hours=3)  # how long ranks wait for rank 0 to read the weights: 16 GB at 2 MB/s


def use_expandable_segments(device, environ=os.environ):
    """On CUDA, let the caching allocator grow segments in place (PyTorch's expandable_segments), unless the user set
    PYTORCH_CUDA_ALLOC_CONF: the attack's per-response graphs and a growing KV cache otherwise fragment memory into
    blocks too small to reuse. Must run before the first CUDA allocation."""
    if device.startswith("cuda"):
        environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def setup_distributed(cfg):
    """Under torchrun: join the process group and pick this rank's device. Returns (rank, world_size)."""
    use_expandable_segments(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    # A collective's tensor must live on a device its backend serves. NCCL serves CUDA tensors only, while metrics,
    # token counts and gathered objects are CPU tensors: the GPU process group pairs NCCL with gloo for those (a few
    # scalars a step), so no call site has to copy its tensor to the GPU and back, and none can forget to.
    if not cfg.device.startswith("cuda"):
        dist.init_process_group("gloo")
        return dist.get_rank(), world
    # the device first, and named to the group: NCCL then knows each rank's GPU from the start, instead of guessing
    # GPU 0 for its first barrier (a hang when several ranks share a node)
    cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    torch.cuda.set_device(cfg.device)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device(cfg.device))
    return dist.get_rank(), world


def leave_process_group(wait=True):
    """Leave the process group, if this process is in one. wait: first wait for the other ranks (a rank leaving
    early can abort its peer in gloo); not after an error that may be this rank's alone, when they may never come."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def from_rank0(obj):
    """Rank 0's `obj` (any picklable object) on every rank; `obj` itself in a single process."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def all_reduce_sum(t):
    """Sum a tensor over ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t):
    """Elementwise maximum of a tensor over ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def global_std(values):
    """Unbiased standard deviation of (n,) values over every rank's values (one process: values.std())."""
    s = all_reduce_sum(torch.stack([values.sum(), (values ** 2).sum(), torch.tensor(float(values.numel()))]).double())
    return ((s[1] - s[0] ** 2 / s[2]) / (s[2] - 1)).clamp(min=0).sqrt().item()


def load_on_rank0(name, rank, seed):
    """Rank 0 reads the model (load_policy, on the CPU); the other ranks build the same architecture on the meta
    device, which holds no memory. Returns (model, tokenizer, weights): weights is rank 0's {name: tensor} of every
    parameter and buffer (None elsewhere), for `shard` to hand out. One full copy in host memory per node, not one
    per rank (7B: 33 GB each). A load error on rank 0 stops every rank with its one line."""
    shared = [None, None, None]  # tokenizer, config, error
    # the other ranks wait while rank 0 reads, a first download included (7B: 16 GB), longer than a collective's
    # default 30 minutes: on a group of their own with a longer timeout, so a hang elsewhere is still found soon
    waiting = dist.new_group(backend="gloo", timeout=LOAD_TIMEOUT)
    if rank == 0:
        try:
            model, tok = load_policy(name, seed=seed)
            shared[:2] = tok, model.config
        except SystemExit as e:
            shared[2] = str(e)
    dist.broadcast_object_list(shared, src=0, group=waiting)
    tok, config, error = shared
    if error:
        raise SystemExit(error)
    if rank != 0:
        with torch.device("meta"):
            model = use_patch_projection(Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32))
        return model, tok, None
    weights = dict(model.named_buffers())  # buffers too: rotary frequencies are not in the state dict
    weights.update(model.state_dict())
    return model, tok, weights


def shard(policy, compute_dtype, device="cpu", weights=None):
    """FSDP2: one shard group per vision block and per decoder layer, the rest (embeddings, LM head) at the root.

    Weights stay fp32 shards (the optimizer's master copy); each forward gathers them in compute_dtype.
    With `weights` from load_on_rank0 (the model on the meta device on ranks other than 0), the shards are
    allocated on `device` and filled from rank 0, one tensor at a time; without, the model's own weights are sharded.
    """
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in policy.model.visual.blocks:
        fully_shard(block, mp_policy=mp)
    for layer in policy.model.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    if weights is not None or any(p.is_meta for p in policy.parameters()):
        policy.to_empty(device=device)  # every rank alike: rank 0's values come back from `weights` below
        keys = set(policy.state_dict()) if weights is not None else set()
        set_model_state_dict(policy, {k: v for k, v in (weights or {}).items() if k in keys},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, buffer in policy.named_buffers():  # replicated, not sharded: rank 0's copy for everyone
            if weights is not None:
                buffer.copy_(weights[name])
            dist.broadcast(buffer, src=0)
    # FSDP wants the root's forward first; generate() would reach the vision blocks before it
    with torch.no_grad():
        device = next(policy.parameters()).device
        ids = torch.full((1, 4), policy.config.image_token_id, device=device)  # 16 patches = 4 merged tokens
        policy(input_ids=ids, pixel_values=torch.zeros(16, 1176, device=device),
               image_grid_thw=torch.tensor([[1, 4, 4]], device=device), use_cache=False, logits_to_keep=1)
    reshard(policy)  # the root keeps its weights gathered after a forward; the optimizer must see the shards


def reshard(policy):
    """Put every FSDP2 group back to its sharded parameters (the objects the optimizer and state dicts know)."""
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def global_mean(values):
    """Mean of a 1-D tensor over every rank's entries."""
    total, count = all_reduce_sum(torch.tensor([values.double().sum().item(), float(values.numel())])).tolist()
    return total / count


def global_sum(value):
    """A number summed over ranks."""
    return all_reduce_sum(torch.tensor(float(value))).item()

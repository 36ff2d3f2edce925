# GRPO (the baseline) on Geometry3K, Qwen2.5-VL-7B.
# Recipe: the paper family's 7B values (DESIGN §4, from NoisyRollout's released scripts, on which SaEI's
# comparison is built). On one node of 8 GPUs:
#   torchrun --nproc_per_node=8 train.py config/geo3k_grpo.py
model = "Qwen2.5-VL-7B"
dataset = "geometry3k"
train_split = "train"            # 2,101 problems
eval_split = "test"              # 601 problems, greedy
out_dir = "out/geo3k_grpo"
# NoisyRollout samples 512 prompts per step and updates on 4 mini-batches of 128 (no constant here: train.py makes
# one update per rollout batch), so 128 prompts per step keep its update batch, and 246 steps are its 15 epochs
batch_size = 128
max_steps = 246                  # 2101 * 15 / 128
n_clean = 12                     # vanilla GRPO: the same 12 responses per prompt, all on the clean image
n_adv = 0
temperature = 1.0
max_prompt_len = 2048            # longer prompts are dropped (and counted), never truncated
max_response_len = 2048
min_pixels = 262144
max_pixels = 1000000
lr = 1e-6                        # constant, no warmup
weight_decay = 1e-2
clip_low = 0.2
clip_high = 0.2
kl_coef = 0.0                    # no KL, no reference model
entropy_coef = 0.0               # the released scripts add a 1e-3 entropy bonus that the papers do not describe
freeze_vision = True
eval_interval = 20               # NoisyRollout validates every 5 of its 512-prompt steps
eval_limit = 1000                # the whole test split
# memory (our choice, not from the papers): 8 x 80 GB GPUs, FSDP2
micro_batch_size = 4
gradient_checkpointing = True

# SaEI on MMK12, Qwen2.5-VL-3B.
# Recipe: the paper family's 7B values (DESIGN §4, from NoisyRollout's released scripts, on which SaEI's
# comparison is built). The papers report 7B runs; this 3B variant keeps the same recipe. On one node of 8 GPUs:
#   torchrun --nproc_per_node=8 train.py config/mmk12_saei_3b.py
model = "Qwen2.5-VL-3B"
dataset = "mmk12"
train_split = "train"            # 6,457 problems (MMK12 in free form: xyliu6/k12-freeform)
eval_split = "test"              # 808 problems, greedy
out_dir = "out/mmk12_saei_3b"
# NoisyRollout samples 512 prompts per step and updates on 4 mini-batches of 128 (no constant here: train.py makes
# one update per rollout batch), so 128 prompts per step keep its update batch, and 504 steps are its 10 epochs
batch_size = 128
max_steps = 504                  # 6457 * 10 / 128
n_clean = 6                      # n1: responses on the clean image
n_adv = 6                        # n2: responses on the adversarial image
perturb = "egas"
tsec_band = (1 / 3, 2 / 3)       # the middle third of the token-entropy ranking
pgd_steps = 1                    # T
pgd_alpha = 2 / 255              # the paper: 2/255 or 3/255
pgd_eps = 2 / 255                # = |alpha| * T
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
micro_batch_size = 8
gradient_checkpointing = True

# GRPO (the baseline) on Geometry3K, Qwen2.5-VL-7B: the SaEI recipe with all 12 responses on the clean image.
#   torchrun --nproc_per_node=8 train.py config/geo3k_grpo.py
include("geo3k_saei.py")
out_dir = "out/geo3k_grpo"
n_clean = 12                     # vanilla GRPO: the same 12 responses per prompt, all on the clean image
n_adv = 0

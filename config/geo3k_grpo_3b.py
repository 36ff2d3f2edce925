# GRPO (the baseline) on Geometry3K, Qwen2.5-VL-3B. The papers report 7B runs; this variant keeps the 7B recipe.
#   torchrun --nproc_per_node=8 train.py config/geo3k_grpo_3b.py
include("geo3k_grpo.py")
model = "Qwen2.5-VL-3B"
out_dir = "out/geo3k_grpo_3b"
micro_batch_size = 8             # memory (our choice): a smaller model fits twice the responses per pass

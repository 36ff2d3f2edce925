# SaEI on Geometry3K, Qwen2.5-VL-7B: train.py's constants are this recipe (the paper family's 7B values,
# from NoisyRollout's released scripts, on which SaEI's comparison is built); this file gives it a name and a folder.
# On one node of 8 GPUs:
#   torchrun --nproc_per_node=8 train.py config/geo3k_saei.py
model = "Qwen2.5-VL-7B"
out_dir = "out/geo3k_saei"

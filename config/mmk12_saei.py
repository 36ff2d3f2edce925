# SaEI on MMK12, Qwen2.5-VL-7B: the Geometry3K recipe on MMK12's free-form K12 problems.
#   torchrun --nproc_per_node=8 train.py config/mmk12_saei.py
include("geo3k_saei.py")
dataset = "mmk12"
train_split = "train"            # 6,457 problems (MMK12 in free form: xyliu6/k12-freeform)
eval_split = "test"              # 808 problems, greedy
out_dir = "out/mmk12_saei"
max_steps = 126                  # 10 epochs at 512 prompts per step: 6457 * 10 / 512

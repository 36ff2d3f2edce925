# The offline demo: the tiny Qwen2.5-VL on the synthetic task, on a laptop CPU (`python train.py`).
model = "assets/tiny-synthetic"  # the shipped warm start (python warmstart.py rebuilds it)
dataset = "synthetic"
min_pixels = 112 * 112
max_pixels = 112 * 112
max_response_len = 96
batch_size = 8
lr = 1e-4
max_steps = 100

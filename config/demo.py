# The offline demo: the tiny Qwen2.5-VL on the synthetic task, on a laptop CPU. `python train.py` runs it (given
# neither a config file nor --model); `python train.py --max_steps=20` runs it shorter.
model = "assets/tiny-synthetic"  # the shipped warm start (python warmstart.py rebuilds it)
dataset = "synthetic"
min_pixels = 112 * 112
max_pixels = 112 * 112
max_response_len = 96
rollout_chunk = 64               # responses per sampling call (the recipe's 0 sizes them by free GPU memory)
batch_size = 8
updates_per_rollout = 1          # one update per rollout batch (4 mini-batches of 2 prompts would be very noisy)
lr = 1e-4
lr_decay = True                  # cosine to 1e-5; at a constant 1e-4 the final accuracy was a lottery (+2 to +14)
max_steps = 100
eval_interval = 0                # held-out accuracy before and after training only
eval_limit = 500                 # the whole synthetic test split
micro_batch_size = 12               # a whole group of 12 in one pass: the prompt is encoded once per group
attack_objective = "full_logits" # the attack's plain objective, every prompt at once (a tiny model: time, not memory, counts)
gradient_checkpointing = False
# The attack's step, from the strength sweep (README, results/alpha): the smallest step that measurably changes the
# rollouts without costing accuracy. At the paper's 2/255 the attacked rollouts' entropy does not move on this model;
# from 32/255 on they lose accuracy. The Qwen recipes keep the paper's 2/255.
pgd_alpha = 8 / 255

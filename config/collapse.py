# The collapse testbed: the tiny Qwen2.5-VL on the synthetic_score task (score a grid: 3 per red square, 1 per blue;
# 33 possible answers; the reasoning -- the red and blue counts, then 3*red+blue -- decides the answer),
# warm-started by `python warmstart.py config/warmstart_score.py`. `python train.py config/collapse.py` runs GRPO in
# the regime where its entropy collapses (results/collapse: on 3 seeds the clean-rollout entropy falls to 0.43-0.50
# of its start in 500 steps while sampled held-out accuracy rises and pass@32 falls; ~45 minutes on one thread).
# reward_reading pays a right answer only when it follows from the response's own counts: without it GRPO learns to
# box the score while the counts drift, and the entropy stays flat. Each rollout batch makes 2 updates, so from the
# second on the policy is off-policy and the clip acts (and with it clip-higher, Clip-Cov, KL-Cov).
model = "assets/tiny-score"
dataset = "synthetic_score"
reward_reading = True
min_pixels = 112 * 112
max_pixels = 112 * 112
max_response_len = 64             # a worked solution is about 45 characters
rollout_chunk = 64               # responses per sampling call (the recipe's 0 sizes them by free GPU memory)
batch_size = 16
n_clean = 8
n_adv = 0
updates_per_rollout = 2
lr = 6e-5
lr_decay = False
max_steps = 500
eval_interval = 100
eval_limit = 200
eval_samples = 16
micro_batch_size = 16
attack_objective = "full_logits"
gradient_checkpointing = False
pgd_alpha = 8 / 255

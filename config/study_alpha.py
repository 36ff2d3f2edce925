# compare.py: the attack-strength sweep. SaEI at PGD step alpha = 2, 8, 32, 64, 128 /255 (T = 1, budget = alpha) against
# GRPO (12 clean responses) and NoisyRollout, on the demo recipe, 3 seeds each.
# `python compare.py config/study_alpha.py --parallel=2` -> results/alpha/, assets/alpha_*.png
methods = "grpo,noisyrollout,saei_a2,saei_a8,saei_a32,saei_a64,saei_a128"
out_dir = "results/alpha"

# compare.py: the TsEC band ablation at 32/255 (T = 1): the sweep's smallest step whose change to the rollouts' entropy
# is clearly above NoisyRollout's random noise (the demo's 8/255 moves them too little to tell bands apart). The attack
# raises the entropy of the bottom, middle (SaEI) or top third of the clean responses' tokens ranked by entropy, or of
# all of them, 3 seeds each; differences are measured against the middle third (SaEI as the paper sets it), and GRPO
# (no attack) is tabulated beside them. saei_a32 and grpo are the sweep's own runs, reused.
# `python compare.py config/study_band.py --parallel=2` -> results/band/, assets/band_curves.png
methods = "grpo,saei_a32_bottom,saei_a32,saei_a32_top,saei_a32_all"
out_dir = "results/band"
reference = "saei_a32"

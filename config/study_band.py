# compare.py: the TsEC band ablation at the sweep's attack strength (32/255, T = 1): the attack raises the entropy of
# the bottom, middle (SaEI) or top third of the clean responses' tokens ranked by entropy, or of all of them;
# GRPO as the reference. 3 seeds each; saei_a32 and grpo are the sweep's own runs, reused.
# `python compare.py config/study_band.py --parallel=2` -> results/band/, assets/band_curves.png
methods = "grpo,saei_a32_bottom,saei_a32,saei_a32_top,saei_a32_all"
out_dir = "results/band"

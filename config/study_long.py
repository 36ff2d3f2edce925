# compare.py: entropy over a longer run. GRPO against SaEI at 32/255 (as the band study) for 300 steps of the demo
# recipe (lr 1e-4, cosine to 1e-5 over the run): does GRPO's rollout entropy collapse on this task, and does SaEI
# keep it up? The per-step entropies are in results/long/curves.csv and assets/long_curves.png.
# `python compare.py config/study_long.py --parallel=2`
methods = "grpo,saei_a32"
steps = 300
out_dir = "results/long"

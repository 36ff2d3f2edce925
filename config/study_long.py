# compare.py: entropy over a longer run. GRPO against SaEI at 32/255 (as the band study) for 200 steps of the demo
# recipe (lr 1e-4, cosine to 1e-5 over the run): does GRPO's rollout entropy collapse on this task, and does SaEI
# keep it up? The per-step entropies are in results/long/curves.csv and assets/long_curves.png.
# `python compare.py config/study_long.py --parallel=2`
methods = "grpo,saei_a32"
steps = 200          # 2x the demo; 300 steps x 3 seeds x 2 methods is ~3 h on 2 cores, longer than a session
out_dir = "results/long"

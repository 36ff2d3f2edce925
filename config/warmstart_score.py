# warmstart.py for the collapse testbed: the demo's warm start (which reads a grid and counts one colour) taught the
# synthetic_score task's worked solutions (the red and blue counts, in either order, then 3*red+blue). It stops once
# greedy validation accuracy reaches stop_accuracy and at least 80% of its answers follow from its own counts.
# `python warmstart.py config/warmstart_score.py` -> assets/tiny-score
task = "synthetic_score"
init_from = "assets/tiny-synthetic"
out_dir = "assets/tiny-score"
steps = 600
lr = 5e-4
eval_start = 100
stop_accuracy = 0.8
test_samples = 4
max_response_len = 48

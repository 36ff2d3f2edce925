# warmstart.py for the collapse testbed: the demo's warm start (which reads the grid row by row) taught the
# synthetic_score task's worked solutions (read the grid by rows or by columns with each line's red and blue counts,
# the totals, 3*red+blue). It stops once greedy validation accuracy reaches stop_accuracy and at least 80% of its
# answers follow from its own reading. `python warmstart.py config/warmstart_score.py` -> assets/tiny-score
task = "synthetic_score"
init_from = "assets/tiny-synthetic"
out_dir = "assets/tiny-score"
steps = 800
lr = 5e-4
eval_start = 100
stop_accuracy = 0.3
test_samples = 4

# compare.py: the off-policy study's pilot. SaEI at 128/255, the paper's convention against the behaviour-corrected
# ratio, one seed pair, 60 steps: does the correction keep the clean rollouts' entropy up?
methods = "saei_a128,saei_a128_behaviour"
seeds = 1
steps = 60
pass_k_problems = 0
out_dir = "results/offpolicy_pilot"
tail_steps = 10

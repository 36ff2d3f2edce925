# compare.py: SaEI's uncorrected off-policy step. The adversarial half is sampled on the attacked image but trained
# as if it had been sampled on the clean one; at 32/255 and up SaEI's clean-rollout entropy fell in 2 of 3 seeds
# (results/alpha, band, long). Arms: GRPO; SaEI at 32/255 as the paper specifies it; the same with the
# behaviour-corrected ratio pi(o|I) / pi_old(o|I_adv) (adv_old_logprob="behaviour"); the same conditioning the
# adversarial half on its own image (logprob_image="adversarial"); and SaEI at -32/255 (the other reading of the
# paper's "alpha = -2/255", which should lower the entropy). 200 steps of the demo recipe, greedy accuracy on 2,000
# held-out problems, pass@1..12 on 500. Primary outcome: each seed's clean-rollout entropy over its last 20 steps.
# `python compare.py config/study_offpolicy.py --parallel=2` -> results/offpolicy/ (its runs in results/offpolicy/runs)
methods = "grpo,saei_a32,saei_a32_behaviour,saei_a32_advimage:3,saei_a-32:3"
seeds = 8
steps = 200
train_args = "--eval_limit=2000"
pass_k_problems = 500
out_dir = "results/offpolicy"
tail_steps = 20

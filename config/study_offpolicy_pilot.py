# compare.py: the off-policy study's pilot, one seed, 60 steps, SaEI at 128/255: the paper family's convention
# (pi_old of the adversarial half read on the clean image) against the behaviour-corrected ratio
# pi(o|I) / pi_old(o|I_adv), with PPO-clip alone (behaviournodual) and with the dual clip at 3 that EasyR1 adds
# (behaviour). Does the correction keep the clean rollouts' entropy up, and at what cost?
methods = "saei_a128,saei_a128_behaviournodual,saei_a128_behaviour"
seeds = 1
steps = 60
pass_k_problems = 0
out_dir = "results/offpolicy_pilot"

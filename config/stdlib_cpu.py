# README's main job: a deep, narrow model (16 layers x 128) trained from scratch on the stdlib corpus with the
# LayerSkip recipe on 2 CPU cores. python train.py config/stdlib_cpu.py
# Layer dropout rising with depth and over time (from scratch: S(t) exponential, p_max 0.1) and the early-exit loss
# on a rotational curriculum (every 8th layer's exit each step, plus the last; e_scale 1.0), so that every exit is
# trained and self-speculation has a draft that agrees. Measured against the same run without them (one run each,
# the same schedule, benchmarks/reports/2026-12-01-epyc-avx2-2core.md): every exit is better, full depth
# too, and from exit 6 on the exits agree with full depth far more often; p_max 0.2 no better at full depth (one run). 600 steps of 8 x 256
# tokens: about 15 minutes of training here, and 0.21 better at full depth than 300 steps of 16 x 256 (the same
# tokens).
out_dir = "out"
data_dir = "data/stdlib"
model = "stdlib-16l"
micro_batch = 8
block_size = 256
max_steps = 600
warmup_steps = 60
lr = 3e-3
min_lr = 3e-4
eval_interval = 100
eval_batches = 10
p_max = 0.1
dropout_curriculum = "exp"
early_exit_curriculum = "rotational"
exit_period = 8
e_scale = 1.0

"""mfa-proxy's benchmarks (``scripts/bench``). Measuring instruments, not tests:
they print figures and ratios against baselines measured in the same run and
never pass or fail on them."""

"""What tests and benchmarks configure central with."""

OPS_TOKEN = "ops-7Hq2Lm9XvB4nR8tK1wZc5Yd3Fs6Gj0PaUe"  # 38 characters, 36 distinct: strong enough for production

"""Benchmarks of scistreamd against its baselines on the test bed (`make bench`)."""

"""Evaluation: lm-eval model wrapper, perplexity, speed benchmarks and plots."""

"""Evaluation: lm-eval model wrapper, perplexity, speed benchmarks and plots. The kernel-development tools (per-kernel
reports, SASS, floors, precision, the kernel-level benchmark) are in kernel_dev/."""

"""Kernel-development tools: what the kernels' authors run on the device (or, for floors and SASS, on the CPU) to
time, inspect and check the Triton ops; the user-facing evaluations stay one level up in `hybrid_mamba3.evals`.

- kernel_report.py   per-kernel registers, spills, shared memory and GPU ms; A/B of launch options and constants
- kernel_sass.py     the kernels compiled for sm_90a without a GPU (registers, spills, SASS mix); CI's compile check
- kernel_floors.py   each kernel's floor (FLOPs and fewest bytes) beside its measured time
- grad_precision.py  bf16 output and gradients against the op's fp32 path at long sequences
- bench_mamba3.py    the layer-level speed benchmark against the official mamba-ssm kernels and SDPA (with
                     bench_trace.py and bench_report.py)

They are scripts (`python3 evals/kernel_dev/<tool>.py --help`); measurements made with them are in kernels/NOTES.md
and evals/results/.
"""

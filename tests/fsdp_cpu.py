"""FSDP on the CPU, for tests: accelerate turns FSDP on only where there is an accelerator (GPU, XPU, ...); on the CPU a
run given an FSDP plugin trains under DDP instead, silently. `lift_cpu_gate()` makes a CPU (gloo) state that was given
a plugin an FSDP state, as a GPU one is, so FSDP2 itself shards the model. `python tests/fsdp_cpu.py ARGS...` runs the
hybrid-mamba3 CLI so (under torchrun)."""

import sys


def lift_cpu_gate() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if getattr(init, "lifted", False):
        return

    def lifted(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    lifted.lifted = True
    state.AcceleratorState.__init__ = lifted


if __name__ == "__main__":
    lift_cpu_gate()
    from hybrid_mamba3.cli import main

    sys.exit(main(sys.argv[1:]))

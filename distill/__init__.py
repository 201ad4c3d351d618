"""Layer-wise alignment and knowledge distillation from the Transformer teacher (see the distillation issue)."""

"""The LightningModules: classification (base), concept distillation and intrinsic decomposition."""

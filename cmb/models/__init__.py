"""Network architectures (plain nn.Modules) and their thin Lightning wrappers."""

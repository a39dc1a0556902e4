"""HR-VITON networks, with module names matching the official checkpoints."""

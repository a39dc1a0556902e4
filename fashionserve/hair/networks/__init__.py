"""The hair networks, with module names matching the public checkpoints."""

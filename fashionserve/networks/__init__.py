"""PyTorch networks whose state_dict keys match the public checkpoints."""

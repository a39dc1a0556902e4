"""The catalogue networks (garment classifier, PG-GAN generator), module names matching their checkpoints."""

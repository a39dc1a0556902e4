"""Catalogue models: the Fashion-MNIST garment classifier (a gate in front of try-on) and the
progressive-growing GAN fashion generator, with the sliced Wasserstein distance that evaluates it."""

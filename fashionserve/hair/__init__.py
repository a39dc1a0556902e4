"""Hairstyle try-on: networks and pipeline stages."""

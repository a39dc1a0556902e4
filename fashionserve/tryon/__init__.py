"""HR-VITON virtual try-on: label tables, agnostic drawing, sample data and pipeline stages."""

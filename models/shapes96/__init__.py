"""shapes96: the shapes classifier at 96x96, ~120 M MACs, so int8 pays (recipe.py needs TensorFlow)."""

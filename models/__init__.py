"""Demo model recipes (host side) and their TensorFlow-free data generators; see models/README.md."""

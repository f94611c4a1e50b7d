"""Sensor demo: synthetic vibration anomaly detector (recipe.py needs TensorFlow, data.py does not)."""

"""Camera demo: synthetic OpenCV shapes classifier (recipe.py needs TensorFlow, data.py does not)."""

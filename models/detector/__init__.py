"""YOLOv8-style shapes detector: synthetic data generator (``data``) and training recipe (``recipe``)."""

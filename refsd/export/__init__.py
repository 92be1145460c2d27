"""TensorFlow twins of the ops and the .tflite export (extra: export)."""

"""Training side of mnist37: data, models, training loop, ONNX export and publishing."""

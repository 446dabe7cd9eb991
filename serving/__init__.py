"""Serving side of mnist37: model repository, onnxruntime runtime, gRPC server and client.

Nothing here imports torch: a serving image needs onnxruntime, grpcio, prometheus-client,
numpy and pillow only.
"""

"""Deploying a model to the Azure ML FPGA service ("hardware-accelerated models", Azure ML SDK v1).

The SDK reached its end of support on 2026-06-30; see deploy/azureml/README.md. blobscore's worker does not use it:
it speaks the TensorFlow Serving Predict protocol and also works with TF Serving and OpenVINO Model Server.
"""

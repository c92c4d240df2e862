"""Serving the champion with Triton Inference Server: the package promote registers, the model repository
deploy writes from it, the python-backend models, the local server, a client and a load test."""

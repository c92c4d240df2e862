"""The python-backend models of the Triton repository. Each file here is copied into a model's version
folder: preprocess.py, postprocess.py and one engine_*.py become `model.py`; common.py goes beside each
one as `genrec_common.py`."""

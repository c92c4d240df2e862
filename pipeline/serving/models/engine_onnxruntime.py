"""Triton python model: the ONNX variant run by ONNX Runtime (the CUDA provider on a GPU instance when
onnxruntime-gpu is installed, else the CPU provider). Needs only numpy and onnxruntime.

The graph answers like every variant: inputs (history [B, L], lengths [B]) -> outputs (item ids [B, K],
scores [B, K]), in that order. Requests queued together by the dynamic batcher run as one batch. The
USER_ID each row comes with is not used: a graph has no per-user state to keep (docs/INCREMENTAL.md).
"""
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from genrec_common import from_triton, to_triton


class TritonPythonModel:
    def initialize(self, args):
        start = time.perf_counter()
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        here = Path(args["model_repository"]) / args["model_version"]
        spec = json.loads((here / "variant.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["threads"])
        providers = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(str(here / spec["artifact"]), options, providers=providers)
        self.time_bias = params.get("time_bias") == "true"
        self.inputs = [i.name for i in self.session.get_inputs()[: 3 if self.time_bias else 2]]
        self.max_k = int(params["max_k"])
        pb_utils.Logger.log_info(f"{args['model_name']}: {spec['name']} loaded in {time.perf_counter() - start:.1f} s "
                                 f"({self.session.get_providers()[0]}; no user-state cache: an ONNX graph "
                                 "has no encoder state to keep, USER_ID is not used)")

    def execute(self, requests):
        history = [from_triton(pb_utils.get_input_tensor_by_name(r, "HISTORY")) for r in requests]
        lengths = [from_triton(pb_utils.get_input_tensor_by_name(r, "LENGTHS")) for r in requests]
        times = None
        if self.time_bias:
            times = np.concatenate([from_triton(pb_utils.get_input_tensor_by_name(r, "TIMESTAMPS")) for r in requests])
        try:
            ids, scores = self.compute(np.concatenate(history), np.concatenate(lengths), None, times)
        except Exception as err:  # the whole batch fails alike; the server keeps serving
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"engine failed: {err}")) for _ in requests]
        bounds = np.cumsum([len(h) for h in history])[:-1]
        return [pb_utils.InferenceResponse([to_triton(pb_utils, "TOP_IDS", i), to_triton(pb_utils, "TOP_SCORES", s)])
                for i, s in zip(np.split(ids, bounds), np.split(scores, bounds))]

    def compute(self, history: np.ndarray, lengths: np.ndarray, users, times: np.ndarray | None):
        """One batch: history [B, max_len] model ids, lengths [B(, 1)], times [B, max_len] or None (users: not
        used) -> numpy (ids [B, max_k] int64, scores [B, max_k] float32)."""
        given = [history, lengths.reshape(-1)] + ([times] if self.time_bias else [])
        ids, scores = self.session.run(None, dict(zip(self.inputs, given)))[:2]
        return ids[:, : self.max_k].astype(np.int64), scores[:, : self.max_k].astype(np.float32)

"""Triton python model: the variant loaded by the pipeline's own loader (eager, torch.compile, AOTInductor:
whatever pipeline.variants knows), so the server answers exactly as validate measured it.

Needs this project importable by the stub's Python: the local server names it in PYTHONPATH.
Requests queued together by the dynamic batcher run as one batch.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from genrec_common import from_triton, to_triton


# The stub's Python ignores the environment (sys.flags.ignore_environment), PYTHONPATH included.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]


class TritonPythonModel:
    def initialize(self, args):
        from pipeline.core import Variant
        from pipeline.variants import load_variant

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        here = Path(args["model_repository"]) / args["model_version"]
        spec = json.loads((here / "variant.json").read_text())
        spec["artifact"] = str(here / spec["artifact"])
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        torch.set_num_threads(int(params["threads"]))
        self.predict = load_variant(Variant(**spec), self.device, int(params["max_k"]))

    def execute(self, requests):
        history = [from_triton(pb_utils.get_input_tensor_by_name(r, "HISTORY")) for r in requests]
        lengths = [from_triton(pb_utils.get_input_tensor_by_name(r, "LENGTHS")) for r in requests]
        try:
            with torch.inference_mode():
                ids, scores = self.predict(torch.from_numpy(np.concatenate(history)).to(self.device),
                                           torch.from_numpy(np.concatenate(lengths).reshape(-1)).to(self.device), None)
        except Exception as err:  # the whole batch fails alike; the server keeps serving
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"engine failed: {err}")) for _ in requests]
        ids, scores = ids.cpu().numpy(), scores.float().cpu().numpy()
        bounds = np.cumsum([len(h) for h in history])[:-1]
        return [pb_utils.InferenceResponse([to_triton(pb_utils, "TOP_IDS", i), to_triton(pb_utils, "TOP_SCORES", s)])
                for i, s in zip(np.split(ids, bounds), np.split(scores, bounds))]

"""Triton python model: the variant loaded by the pipeline's own loader (eager, torch.compile, AOTInductor:
whatever pipeline.variants knows), so the server answers exactly as validate measured it.

Needs this project importable by the stub's Python: the local server names it in PYTHONPATH.
Requests queued together by the dynamic batcher run as one batch. initialize() calls the variant once per
batch shape (1 and >1) so that whatever compiles at the first call (torch.compile: a hit in Inductor's
on-disk caches the pipeline filled, when they are shared) does so while the model loads, never under a
request.
"""
import json
import locale
import os
import sys
import time
from pathlib import Path

import numpy as np


def _utf8_locale() -> None:
    """The stub's Python starts isolated: no UTF-8 mode and no locale from the environment, so with no
    locale set its default text encoding is ASCII, and Inductor reads its UTF-8 code templates with it
    (UnicodeDecodeError at load). open() asks the C locale each time: a UTF-8 one fixes it."""
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue


_utf8_locale()
# The stub's Python ignores the environment (sys.flags.ignore_environment), PYTHONPATH included.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import torch  # noqa: E402  (after the locale: torch._inductor reads files at import)
import triton_python_backend_utils as pb_utils  # noqa: E402
from genrec_common import from_triton, to_triton  # noqa: E402


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
        self.time_bias = params.get("time_bias") == "true"
        start = time.perf_counter()
        self.predict = load_variant(Variant(**spec), self.device, int(params["max_k"]))
        self._warm(int(params["max_len"]))
        pb_utils.Logger.log_info(f"{args['model_name']}: {spec['name']} loaded and warmed in "
                                 f"{time.perf_counter() - start:.1f} s on {self.device}")

    def _warm(self, max_len: int) -> None:
        for batch in (1, 2):
            history = torch.ones(batch, max_len, dtype=torch.int64, device=self.device)
            times = torch.zeros_like(history) if self.time_bias else None
            with torch.inference_mode():
                self.predict(history, torch.ones(batch, dtype=torch.int64, device=self.device), times)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def execute(self, requests):
        history = [from_triton(pb_utils.get_input_tensor_by_name(r, "HISTORY")) for r in requests]
        lengths = [from_triton(pb_utils.get_input_tensor_by_name(r, "LENGTHS")) for r in requests]
        times = None
        if self.time_bias:
            times = torch.from_numpy(np.concatenate(
                [from_triton(pb_utils.get_input_tensor_by_name(r, "TIMESTAMPS")) for r in requests])).to(self.device)
        try:
            with torch.inference_mode():
                ids, scores = self.predict(torch.from_numpy(np.concatenate(history)).to(self.device),
                                           torch.from_numpy(np.concatenate(lengths).reshape(-1)).to(self.device), times)
        except Exception as err:  # the whole batch fails alike; the server keeps serving
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"engine failed: {err}")) for _ in requests]
        ids, scores = ids.cpu().numpy(), scores.float().cpu().numpy()
        bounds = np.cumsum([len(h) for h in history])[:-1]
        return [pb_utils.InferenceResponse([to_triton(pb_utils, "TOP_IDS", i), to_triton(pb_utils, "TOP_SCORES", s)])
                for i, s in zip(np.split(ids, bounds), np.split(scores, bounds))]

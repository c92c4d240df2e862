"""Triton python model: a request's history of raw item ids -> the engine's padded model ids and lengths
(and, for a time-bias model, the TIMESTAMPS of the history's actions, padded alike).

Checks every request (empty, too long, negative or unknown ids, k out of range, a negative USER_ID) and
answers a bad one with an error naming what was wrong; the other requests of the batch are served as usual.
USER_ID is optional: a request without it hands the engine NO_USER (-1) per row, so that the engine's
requests all carry the same inputs and batch together. The checks are genrec_common.Request's, which the
fused engine (serving.fused) runs too.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from genrec_common import RequestError, Vocabulary, read_request, to_triton


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.max_len = int(params["max_len"]["string_value"])
        self.max_k = int(params["max_k"]["string_value"])
        self.time_bias = params.get("time_bias", {}).get("string_value") == "true"
        here = Path(args["model_repository"]) / args["model_version"]
        self.vocabulary = Vocabulary(np.load(here / "item_ids.npy"))

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            checked = read_request(pb_utils, request, self.vocabulary, self.max_len, self.max_k, self.time_bias)
        except RequestError as err:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {err}"))
        outputs = [to_triton(pb_utils, "HISTORY_PADDED", checked.history), to_triton(pb_utils, "LENGTHS", checked.lengths),
                   to_triton(pb_utils, "USER_IDS", checked.users)]
        if self.time_bias:
            outputs.append(to_triton(pb_utils, "TIMESTAMPS_PADDED", checked.times))
        return pb_utils.InferenceResponse(outputs)

"""Triton python model: a request's history of raw item ids -> the engine's padded model ids and lengths
(and, for a time-bias model, the TIMESTAMPS of the history's actions, padded alike).

Checks every request (empty, too long, negative or unknown ids, k out of range, a negative USER_ID) and
answers a bad one with an error naming what was wrong; the other requests of the batch are served as usual.
USER_ID is optional: a request without it hands the engine NO_USER (-1) per row, so that the engine's
requests all carry the same inputs and batch together.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from genrec_common import (RequestError, Vocabulary, check_request, check_timestamps, from_triton, pad, to_triton,
                           unpack_text, user_ids)


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
            history = from_triton(pb_utils.get_input_tensor_by_name(request, "HISTORY"))
            if self.vocabulary.text:  # UINT8 [B, bytes]: the ids of each row as UTF-8 text, newline-separated
                history = unpack_text(history)
            k = from_triton(pb_utils.get_input_tensor_by_name(request, "K"))
            check_request(history, k, self.max_len, self.max_k)
            padded, lengths = pad(self.vocabulary.encode(history), self.max_len)
            user = pb_utils.get_input_tensor_by_name(request, "USER_ID")
            users = user_ids(None if user is None else from_triton(user), history.shape[0])
            outputs = [to_triton(pb_utils, "HISTORY_PADDED", padded), to_triton(pb_utils, "LENGTHS", lengths),
                       to_triton(pb_utils, "USER_IDS", users)]
            if self.time_bias:  # an optional input: None when the request has none
                given = pb_utils.get_input_tensor_by_name(request, "TIMESTAMPS")
                times = check_timestamps(None if given is None else from_triton(given), history)
                outputs.append(to_triton(pb_utils, "TIMESTAMPS_PADDED", pad(times, self.max_len)[0]))
        except RequestError as err:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {err}"))
        return pb_utils.InferenceResponse(outputs)

"""Triton python model: the engine's top-K model ids and scores -> the first k as raw item ids
(genrec_common.answer, which the fused engine, serving.fused, runs too)."""
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from genrec_common import Vocabulary, answer, from_triton, to_triton


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        self.vocabulary = Vocabulary(np.load(here / "item_ids.npy"))

    def execute(self, requests):
        responses = []
        for request in requests:
            ids = from_triton(pb_utils.get_input_tensor_by_name(request, "TOP_IDS"))
            scores = from_triton(pb_utils.get_input_tensor_by_name(request, "TOP_SCORES"))
            k = int(from_triton(pb_utils.get_input_tensor_by_name(request, "K")).reshape(-1)[0])  # checked by preprocess
            raw, scores = answer(self.vocabulary, ids, scores, k)
            responses.append(pb_utils.InferenceResponse([to_triton(pb_utils, "ITEM_IDS", raw),
                                                         to_triton(pb_utils, "SCORES", scores)]))
        return responses

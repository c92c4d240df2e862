"""Triton python model: the engine's top-K model ids and scores -> the first k as raw item ids."""
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from genrec_common import Vocabulary, from_triton, pack_text, to_triton


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
            raw = self.vocabulary.decode(ids[:, :k])
            if self.vocabulary.text:  # UINT8 [B, bytes]: each row's ids as UTF-8 text, newline-separated
                raw = pack_text(raw)
            responses.append(pb_utils.InferenceResponse([
                to_triton(pb_utils, "ITEM_IDS", raw),
                to_triton(pb_utils, "SCORES", scores[:, :k].astype(np.float32)),
            ]))
        return responses

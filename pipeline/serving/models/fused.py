"""Triton python model: preprocess, the engine and postprocess in one model (serving.fused=true), so that a
request costs one python-backend stub round trip instead of three.

Takes the client's inputs (HISTORY raw ids [B, L] with L free per request, or UINT8 text ids; K; USER_ID and,
for a time-bias model, TIMESTAMPS) and answers ITEM_IDS and SCORES. HISTORY is a ragged input, so the dynamic
batcher queues requests of different lengths together. Each request is checked and mapped on its own
(genrec_common.Request: the checks and messages of the preprocess model); a bad one gets its error, the
others of the batch run as one batch through the engine's compute() (genrec_engine.py: engine_torch or
engine_onnxruntime, with their batch buckets, returning-users cache and metrics), and each answer is cut to
its k and mapped back to raw ids (genrec_common.answer, as postprocess does).
"""
import json
from pathlib import Path

import numpy as np
from genrec_common import RequestError, Vocabulary, answer, read_request, to_triton
from genrec_engine import TritonPythonModel as Engine
from genrec_engine import pb_utils


class TritonPythonModel(Engine):
    def initialize(self, args):
        super().initialize(args)
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.max_len, self.max_k = int(params["max_len"]), int(params["max_k"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.vocabulary = Vocabulary(np.load(here / "item_ids.npy"))

    def execute(self, requests):
        responses, good = [None] * len(requests), []
        for i, request in enumerate(requests):
            try:
                good.append((i, read_request(pb_utils, request, self.vocabulary, self.max_len, self.max_k,
                                             self.time_bias)))
            except RequestError as err:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {err}"))
        if not good:
            return responses
        checked = [c for _, c in good]
        try:
            ids, scores = self.compute(
                np.concatenate([c.history for c in checked]), np.concatenate([c.lengths for c in checked]),
                np.concatenate([c.users for c in checked]),
                np.concatenate([c.times for c in checked]) if self.time_bias else None)
        except Exception as err:  # the whole batch fails alike; the server keeps serving
            for i, _ in good:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"engine failed: {err}"))
            return responses
        start = 0
        for i, c in good:
            raw, top = answer(self.vocabulary, ids[start: start + c.rows], scores[start: start + c.rows], c.k)
            start += c.rows
            responses[i] = pb_utils.InferenceResponse([to_triton(pb_utils, "ITEM_IDS", raw),
                                                       to_triton(pb_utils, "SCORES", top)])
        return responses

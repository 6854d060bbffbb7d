"""Teacher-forced scoring (editlab/evaluation/teacher_forced.py): only the scored logits, any chunking."""

import pytest
import torch

from editlab.data.collate import encode_pairs
from editlab.evaluation.teacher_forced import score_pairs

from conftest import ALL_TYPES

PROMPTS = ["The capital of France is", "Danielle Darrieux speaks", "The iPhone is made by the company"]
TARGETS = ["Paris", "French and English", "Apple"]


def _manual(bundle, prompts, targets):
    """Full forward, full-vocabulary log-softmax, explicit indexing: the reference."""
    seq2seq = bundle.model.config.is_encoder_decoder
    nll, preds = [], []
    for p, t in zip(prompts, targets):
        b = encode_pairs(bundle.tokenizer, [p], [t], seq2seq=seq2seq,
                         decoder_start_token_id=getattr(bundle.model.config, "decoder_start_token_id", None))
        with torch.no_grad():
            logits = bundle.model(**b.model_inputs()).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        n = int(b.target_mask[0].sum())
        pos = b.positions[0, :n]
        tgt = b.target_ids[0, :n]
        nll.append(float(-logp[pos, tgt].mean()))
        preds.append(logits[pos].argmax(-1).tolist())
    return nll, preds


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_scores_match_full_forward(tiny, model_type):
    bundle = tiny(model_type)
    scores = score_pairs(bundle.model, bundle.tokenizer, PROMPTS, TARGETS, chunk_size=2)
    nll, preds = _manual(bundle, PROMPTS, TARGETS)
    assert torch.allclose(scores.nll, torch.tensor(nll), atol=1e-4)
    for i, p in enumerate(preds):
        n = len(p)
        assert scores.mask[i].sum() == n
        assert scores.pred[i, :n].tolist() == p


def test_chunking_and_order_do_not_matter(tiny):
    bundle = tiny("llama")
    a = score_pairs(bundle.model, bundle.tokenizer, PROMPTS, TARGETS, chunk_size=1)
    b = score_pairs(bundle.model, bundle.tokenizer, PROMPTS, TARGETS, chunk_size=64)
    assert torch.allclose(a.nll, b.nll, atol=1e-5)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.mask, b.mask)

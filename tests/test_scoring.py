"""The LM-head primitives (editlab/scoring.py) that editors and evaluation share."""

import pytest
import torch

from editlab.scoring import head_logits, head_nll


@pytest.mark.parametrize("cap", [None, 3.0])
def test_fused_head_nll_matches_log_softmax_and_its_gradient(tiny, cap, monkeypatch):
    bundle = tiny("gemma3_text")
    monkeypatch.setattr(bundle.model.config, "final_logit_softcapping", cap)
    torch.manual_seed(0)
    d = bundle.model.get_output_embeddings().weight.shape[1]
    hidden = torch.randn(5, d, requires_grad=True)
    targets = torch.tensor([3, 17, 17, 100, 250])
    ref = -torch.log_softmax(head_logits(bundle.model, hidden), -1).gather(1, targets[:, None]).squeeze(1)
    (g_ref,) = torch.autograd.grad((ref * torch.arange(1.0, 6.0)).sum(), hidden)
    fused = head_nll(bundle.model, hidden, targets, chunk=64)  # several chunks over the vocabulary
    (g_fused,) = torch.autograd.grad((fused * torch.arange(1.0, 6.0)).sum(), hidden)
    assert torch.allclose(fused, ref, atol=1e-5)
    assert torch.allclose(g_fused, g_ref, atol=1e-5)

"""ActDistill losses and graph heads against the formulas of docs/METHOD.md."""

import pytest
import torch

from actdistill_ros.distill.graph_heads import GraphInformedHead
from actdistill_ros.distill.losses import (balance_loss, budget_loss, depth_weights, masked_mse, semantic_loss,
                                           triple_action_loss)


def test_depth_weights_follow_the_power_law_and_average_one():
    w = depth_weights(5, gamma=2.0)
    raw = torch.tensor([(l / 4) ** 2 for l in range(5)])
    torch.testing.assert_close(w, raw / raw.mean())
    assert w.mean().item() == pytest.approx(1.0) and w[0] == 0 and torch.all(w[1:] > w[:-1])


def test_semantic_loss_is_alignment_plus_eta_times_relational_mse():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    eta = 0.5
    got = semantic_loss(student, teacher, eta)
    for layer in range(3):
        s, t = student[layer], teacher[layer]
        align = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
        cs = torch.nn.functional.cosine_similarity(s[:, None], s[None], dim=-1)
        ct = torch.nn.functional.cosine_similarity(t[:, None], t[None], dim=-1)
        assert got[layer].item() == pytest.approx((align + eta * ((cs - ct) ** 2).mean()).item(), rel=1e-5)
    assert semantic_loss(teacher, teacher, eta).abs().max().item() < 1e-6


def test_triple_action_loss_uses_ground_truth_teacher_and_the_stopped_previous_layer():
    torch.manual_seed(0)
    student = torch.randn(3, 2, 4, 2, requires_grad=True)
    teacher, truth = torch.randn(3, 2, 4, 2), torch.randn(2, 4, 2)
    valid = torch.ones(2, 4, dtype=torch.bool)
    got = triple_action_loss(student, teacher, truth, valid)
    previous = [torch.zeros_like(student[0]), student[0], student[1]]
    for layer in range(3):
        s = student[layer]
        expected = ((s - truth) ** 2).mean() + ((s - teacher[layer]) ** 2).mean() + ((s - previous[layer]) ** 2).mean()
        assert got[layer].item() == pytest.approx(expected.item(), rel=1e-5)
    # stopgrad(a_{l-1}): layer 1's loss sends no gradient into layer 0's probe.
    got[1].backward()
    assert student.grad[0].abs().sum() == 0 and student.grad[1].abs().sum() > 0


def test_masked_mse_ignores_padded_chunk_steps_and_weighs_samples_equally():
    prediction, target = torch.zeros(2, 3, 1), torch.ones(2, 3, 1)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    assert masked_mse(prediction, target, valid).item() == pytest.approx(4 / 6)
    halves = (masked_mse(prediction[:1], target[:1], valid[:1]) + masked_mse(prediction[1:], target[1:], valid[1:])) / 2
    assert halves.item() == pytest.approx(masked_mse(prediction, target, valid).item())


def test_balance_and_budget_terms():
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert balance_loss(gates).item() == pytest.approx(0.25)  # layer means 1 and 0: variance 0.25
    assert balance_loss(torch.full((4, 3), 0.3)).item() == pytest.approx(0.0)
    assert budget_loss(gates, 0.5).item() == pytest.approx(0.0)
    assert budget_loss(torch.ones(2, 2), 0.5).item() == pytest.approx(0.25)


def test_graph_head_gives_the_same_result_with_or_without_padding_tokens():
    torch.manual_seed(0)
    head = GraphInformedHead(model_width=16, width=8, top_k=8, heads=2, dropout=0.0, chunk_size=2, action_dim=3).eval()
    hidden = torch.randn(1, 10, 16)
    valid = torch.tensor([[True] * 4 + [False] * 6])  # fewer valid tokens than k: top-k reaches padding
    padded_s, padded_a = head(hidden, valid)
    alone_s, alone_a = head(hidden[:, :4], valid[:, :4])
    torch.testing.assert_close(padded_s, alone_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_a, alone_a, atol=1e-5, rtol=1e-5)
    assert padded_a.shape == (1, 2, 3)


def test_graph_edges_stay_finite_for_large_activations():
    head = GraphInformedHead(model_width=16, width=8, top_k=4, heads=2, dropout=0.0, chunk_size=1, action_dim=1).eval()
    s, a = head(1e4 * torch.randn(2, 12, 16), torch.ones(2, 12, dtype=torch.bool))
    assert torch.isfinite(s).all() and torch.isfinite(a).all()

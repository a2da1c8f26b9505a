"""Distillation losses: the cosine of (mean-pooled) outputs, and the choice of loss on unlabeled batches."""
import pytest
import torch

from fedcore_adapter.losses import distillation_mse, pooled_cosine_distance, pooled_outputs, unlabeled_distillation


def test_per_token_outputs_are_mean_pooled_over_the_real_tokens_only():
    out = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # 1 sentence x 3 tokens x 2, the last is padding
    assert pooled_outputs(out, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 1.0]]
    assert pooled_outputs(out).shape == (1, 6)  # no mask: the whole output is the sample's vector


def test_the_cosine_distance_is_zero_for_embeddings_of_the_same_direction_and_ignores_padding():
    teacher = torch.randn(4, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[:, 3:] = 0
    student = 3.0 * teacher  # same sentence embeddings up to their length
    student[:, 3:] = torch.randn(4, 2, 8)  # differs only on padded tokens
    assert pooled_cosine_distance(student, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert pooled_cosine_distance(student, teacher).item() > 1e-3  # without the mask the padding counts
    assert pooled_cosine_distance(-teacher, teacher, mask).item() == pytest.approx(2.0, abs=1e-6)


def test_the_cosine_distance_is_the_mean_over_samples_of_one_minus_the_embeddings_cosine():
    teacher, student = torch.randn(6, 4, 8), torch.randn(6, 4, 8)
    mask = torch.ones(6, 4, dtype=torch.long)
    mask[0, 2:] = 0
    expected = 1 - torch.nn.functional.cosine_similarity(pooled_outputs(student, mask), pooled_outputs(teacher, mask))
    assert pooled_cosine_distance(student, teacher, mask).item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_a_cosine_needs_a_vector_per_sample():
    with pytest.raises(ValueError, match=r"a cosine needs a vector per sample; the output has shape \(4,\)"):
        pooled_cosine_distance(torch.randn(4), torch.randn(4))


def test_unlabeled_distillation_is_the_masked_mse_or_the_cosine_plus_a_weighted_mse():
    teacher, student = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mse = distillation_mse(student, teacher, mask)
    cosine = pooled_cosine_distance(student, teacher, mask)
    assert unlabeled_distillation(student, teacher, mask) == mse
    assert unlabeled_distillation(student, teacher, mask, "cosine") == cosine
    assert unlabeled_distillation(student, teacher, mask, "cosine", 0.5).item() == pytest.approx(
        (cosine + 0.5 * mse).item())

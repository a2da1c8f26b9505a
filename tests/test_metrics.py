"""Measurement: exact counts, honest sizes, latency as a median after warm-up."""
import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore_adapter.metrics import count_macs, count_params, evaluate, latency_ms, measure, sparsity, state_dict_bytes


def test_macs_of_linear_and_conv_are_exact_per_sample():
    linear = nn.Linear(10, 4)
    assert count_macs(linear, torch.randn(7, 10)) == 10 * 4
    conv = nn.Conv1d(2, 3, kernel_size=5, padding=2)
    assert count_macs(conv, torch.randn(5, 2, 40)) == 40 * 3 * 2 * 5


def test_params_count_every_weight():
    assert count_params(nn.Linear(10, 4)) == 44


def test_state_dict_bytes_is_what_torch_save_writes():
    model = nn.Linear(100, 100)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert state_dict_bytes(model) == buffer.tell()


def test_accuracy_and_loss_on_a_known_classifier():
    x = torch.eye(3).repeat(4, 1)
    y = torch.tensor([0, 1, 2] * 4)
    y[0] = 1  # one wrong label out of 12
    model = nn.Identity()
    out = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=5), nn.CrossEntropyLoss(), torch.device("cpu"))
    assert out["accuracy"] == pytest.approx(11 / 12)
    expected = nn.CrossEntropyLoss()(x, y).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-5)


def test_latency_runs_warmup_then_the_requested_repeats():
    calls = []
    model = nn.Linear(4, 4)
    model.register_forward_hook(lambda *a: calls.append(1))
    times = latency_ms(model, torch.randn(2, 4), torch.device("cpu"), warmup=2, repeats=5, min_warmup_s=0)
    assert len(times) == 5 and len(calls) == 7 and all(t > 0 for t in times)


def test_sparsity_counts_zero_weights():
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0] = 1
    assert sparsity(model) == pytest.approx(15 / 16)


def test_measure_reports_throughput_consistent_with_latency():
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.zeros(16, dtype=torch.long)), batch_size=8)
    row = measure(nn.Linear(4, 2), loader, device=torch.device("cpu"), loss_fn=nn.CrossEntropyLoss(), repeats=3)
    assert row["batch_size"] == 8
    assert row["throughput_sps"] == pytest.approx(8 * 1000 / row["latency_ms"])
    assert row["dtype"] == "float32" and row["device"] == "cpu" and row["macs"] == 8


def test_a_padded_batch_shape_is_its_per_event_features_batch_by_padded_length():
    from ptls.data_load.padded_batch import PaddedBatch

    from fedcore_adapter.metrics import batch_shape

    x = PaddedBatch({"mcc": torch.randint(1, 9, (3, 5))}, torch.full((3,), 5))
    # a per-sequence feature first (as ptls collates client ids) does not give the shape
    assert batch_shape(PaddedBatch({"client_id": torch.arange(3), **x.payload}, x.seq_lens)) == "3x5"


def _encoder_pair():
    """A tiny text encoder, a copy whose projection is perturbed, and unlabeled dict batches."""
    import copy

    from tests.conftest import TinyEncoder, TokenDataModule

    original = TinyEncoder()
    changed = copy.deepcopy(original)
    with torch.no_grad():
        noise = torch.randn(changed.proj.weight.shape, generator=torch.Generator().manual_seed(1))
        changed.proj.weight.add_(0.5 * noise)
    return original, changed, TokenDataModule()


def test_on_unlabeled_batches_cosine_is_the_mean_cosine_of_mean_pooled_outputs_to_the_original():
    original, changed, dm = _encoder_pair()
    expected = []
    for batch in dm.test_dataloader():
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = [(m(**batch).last_hidden_state * mask).sum(1) / mask.sum(1) for m in (changed, original)]
        expected.append(torch.nn.functional.cosine_similarity(*pooled, dim=1))
    got = evaluate(changed, dm.test_dataloader(), None, torch.device("cpu"), original=original)
    assert got["cosine"] == pytest.approx(float(torch.cat(expected).mean()), abs=1e-6) and got["cosine"] < 0.99
    assert evaluate(original, dm.test_dataloader(), None, torch.device("cpu"), original=original)["cosine"] == \
        pytest.approx(1.0, abs=1e-6)
    assert "cosine" not in evaluate(changed, dm.test_dataloader(), None, torch.device("cpu"))  # no original given
    assert measure(changed, dm.test_dataloader(), device=torch.device("cpu"), repeats=2, warmup=1,
                   original=original)["cosine"] == got["cosine"]


def test_cosine_is_left_out_on_labeled_batches_and_where_the_outputs_differ_in_size():
    labeled = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    model = nn.Linear(4, 3)
    assert "cosine" not in evaluate(model, labeled, None, torch.device("cpu"), original=model)
    unlabeled = DataLoader(torch.randn(8, 4), batch_size=4)
    assert "cosine" not in evaluate(model, unlabeled, None, torch.device("cpu"), original=nn.Linear(4, 5))

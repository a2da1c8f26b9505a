"""Pruning with reconstruction: the layer after removed heads / FFN channels is re-fitted by least squares."""
import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fedcore_adapter.errors import NodeError
from fedcore_adapter.nodes.pruning import PruningWarning
from fedcore_adapter.nodes.pruning.backend import make_pruner
from fedcore_adapter.nodes.pruning.config import PruningConfig
from fedcore_adapter.nodes.pruning.history import History, replay_pruning
from fedcore_adapter.nodes.pruning.reconstruction import LayerStats, Reconstruction, layer_stats, obs_choice

transformers = pytest.importorskip("transformers")


def make_bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def batches(n: int, seed: int, pad: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 12, dtype=torch.long)
        if pad:
            mask[:, -pad:] = 0
        out.append({"input_ids": torch.randint(0, 50, (4, 12), generator=g), "attention_mask": mask})
    return out


def hidden(model: nn.Module, data: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).last_hidden_state for b in data])


def prune(model: nn.Module, calibration: list[dict], reconstruct: bool, **options) -> tuple[nn.Module, History]:
    work = copy.deepcopy(model)
    rec = Reconstruction(model, calibration) if reconstruct else None
    history = History()
    make_pruner(work, calibration[0], label="t", reconstruction=rec, **options).step(history, 1)
    return work, history


def relative_error(model: nn.Module, original: nn.Module, data: list[dict]) -> float:
    ref = hidden(original, data)
    return float((hidden(model, data) - ref).norm() / ref.norm())


def test_refitting_the_consumers_lowers_the_error_on_held_out_inputs():
    original, calibration, held_out = make_bert(), batches(16, 0), batches(4, 1)
    for options in ({"ratio": 0.5, "head_ratio": 0.0}, {"ratio": 0.25, "head_ratio": 0.25}):
        plain, _ = prune(original, calibration, reconstruct=False, **options)
        fitted, _ = prune(original, calibration, reconstruct=True, **options)
        widths = [m.encoder.layer[0].intermediate.dense.out_features for m in (plain, fitted)]
        assert widths[0] == widths[1]
        assert relative_error(fitted, original, held_out) < 0.5 * relative_error(plain, original, held_out)


def test_a_duplicated_ffn_channel_is_what_obs_removes_and_the_refit_makes_it_free():
    """Channels 32-63 of each FFN copy channels 0-31: removing either copy of each pair loses nothing once the
    output layer adds the removed copy's column to its twin's, and OBS finds exactly such a set."""
    original = make_bert()
    with torch.no_grad():
        for layer in original.encoder.layer:
            layer.intermediate.dense.weight[32:] = layer.intermediate.dense.weight[:32]
            layer.intermediate.dense.bias[32:] = layer.intermediate.dense.bias[:32]
            layer.output.dense.weight.mul_(20.0)  # the FFN's share of the output, small at BERT's initialisation
    calibration, held_out = batches(16, 0), batches(4, 1)
    fitted, history = prune(original, calibration, reconstruct=True, ratio=0.5, head_ratio=0.0, importance="obs")
    for i in range(2):
        removed = next(op["idxs"] for op in history.ops if op["module"] == f"encoder.layer.{i}.intermediate.dense")
        assert sorted(j % 32 for j in removed) == list(range(32))  # one of each pair
    unfitted, _ = prune(original, calibration, reconstruct=False, ratio=0.5, head_ratio=0.0)
    assert relative_error(unfitted, original, held_out) > 0.1
    assert relative_error(fitted, original, held_out) < 0.01  # what is left is the fit's damping


def test_obs_removes_the_units_the_output_does_not_need_even_when_they_are_the_largest():
    """Inputs in 4 units of 8; the outputs read units 0, 1 and 3 only, and unit 2 has 10x the inputs' scale."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    h[:, 16:24] *= 10.0
    w = torch.randn(6, 32, generator=g, dtype=torch.float64)
    w[:, 16:24] = 0.0
    h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    stats = LayerStats(h1.T @ h1, h1.T @ (h @ w.T + 0.5), len(h))
    assert obs_choice(stats, 8, 1) == [2]
    assert sorted(obs_choice(stats, 1, 8)) == list(range(16, 24))


def test_padded_positions_are_left_out_of_the_statistics():
    model = make_bert()
    stats = layer_stats(model, model, "encoder.layer.0.output.dense", batches(3, 0, pad=5))
    assert stats.tokens == 3 * 4 * 7
    assert stats.gram.shape == (65, 65) and stats.cross.shape == (65, 32)


def test_a_reconstructed_model_replays_exactly_from_its_history():
    original = make_bert()
    fitted, history = prune(original, batches(8, 0), reconstruct=True, ratio=0.5, importance="obs")
    fresh = replay_pruning(make_bert(), history.to_json())
    fresh.load_state_dict(fitted.state_dict(), strict=True)
    torch.testing.assert_close(hidden(fresh.eval(), batches(2, 3)), hidden(fitted, batches(2, 3)))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, stride=2, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 20, 10)).eval()


def test_a_cnn_s_convolutions_and_linear_are_re_fitted_on_their_input_patches():
    """Conv1d consumers are fitted on unfolded patches (stride and padding included), the Linear after the
    flatten on its kept features; a conv that also lost outputs matches only the ones it kept."""
    original = small_cnn()
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(32, 1, 40, generator=g) for _ in range(8)]
    held_out = [torch.randn(32, 1, 40, generator=g) for _ in range(2)]

    def error(model):
        with torch.no_grad():
            out, ref = (torch.cat([m(x) for x in held_out]) for m in (model, original))
        return float((out - ref).norm() / ref.norm())

    plain, _ = prune(original, calibration, reconstruct=False, ratio=0.5)
    fitted, history = prune(original, calibration, reconstruct=True, ratio=0.5)
    assert [m.out_channels for m in fitted if isinstance(m, nn.Conv1d)] == [8, 8, 8]
    assert error(fitted) < 0.5 * error(plain)
    fresh = replay_pruning(small_cnn(), history.to_json())
    fresh.load_state_dict(fitted.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(held_out[0]), fitted(held_out[0]))


@pytest.mark.parametrize("conv, x", [
    (nn.Conv1d(3, 4, 5, stride=2, padding=2, dilation=2), torch.randn(2, 3, 17)),
    (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), torch.randn(2, 3, 9, 7)),
])
def test_a_convolution_is_its_patches_times_its_flattened_weight(conv, x):
    from fedcore_adapter.nodes.pruning.reconstruction import _outputs, _patches

    rows = _patches(conv, x) @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(rows, _outputs(conv, conv(x)))


def test_obs_on_a_model_without_transformer_blocks_is_a_one_line_error():
    cnn = small_cnn()
    rec = Reconstruction(cnn, [torch.randn(2, 1, 40)])
    with pytest.raises(NodeError, match=r"^node t: importance 'obs' ranks the attention heads and FFN channels of "
                                        r"transformer encoders, and this model has none; use magnitude, taylor, lamp, "
                                        r"bn_scale or random \(reconstruct works with each\)$"):
        make_pruner(cnn, torch.randn(2, 1, 40), label="t", ratio=0.5, reconstruction=rec, importance="obs")


@pytest.mark.parametrize("options, message", [
    ({"importance": "obs"}, "importance 'obs' .* needs reconstruct: true"),
    ({"importance": "obs", "reconstruct": True, "global_pruning": True}, "cannot rank them across layers"),
    ({"importance": "obs", "reconstruct": True, "sensitivity_ratios": [0.5]}, "sensitivity_ratios measure"),
])
def test_obs_options_that_cannot_work_are_refused_at_load_time(options, message):
    with pytest.raises(ValidationError, match=message):
        PruningConfig(**options)


def test_the_node_reconstructs_from_training_batches(tmp_path):
    from fedcore_adapter import run_setup

    class Data:
        def train_dataloader(self):
            return batches(8, 0, pad=2)

        def val_dataloader(self):
            return batches(2, 1)

    original = make_bert()
    node = {"kind": "pruning", "pruning_ratio": 0.5, "head_pruning_ratio": 0.0, "reconstruct": True,
            "importance": "obs", "calibration_batches": 8}
    result = run_setup({"name": "R", "common": {"measure": False}, "nodes": [node]}, copy.deepcopy(original),
                       Data(), output_dir=tmp_path)
    plain = run_setup({"name": "P", "common": {"measure": False},
                       "nodes": [{"kind": "pruning", "pruning_ratio": 0.5, "head_pruning_ratio": 0.0}]},
                      copy.deepcopy(original), Data(), output_dir=tmp_path / "p")
    held_out = batches(4, 5)
    assert relative_error(result.model, original, held_out) < 0.5 * relative_error(plain.model, original, held_out)


def test_a_ptls_transformer_encoder_is_re_fitted_on_padded_batches():
    """pytorch-lifestream's TransformerSeqEncoder runs nn.TransformerEncoderLayer on PaddedBatch inputs, where
    PyTorch's fused fast path (nested tensors, linears not called) would hide the FFN's inputs from hooks."""
    from ptls.nn import TransformerSeqEncoder, TrxEncoder

    from fedcore_adapter.zoo import lifestream

    torch.manual_seed(0)
    trx = TrxEncoder(embeddings={"mcc": {"in": 101, "out": 8}, "tr_type": {"in": 11, "out": 3}},
                     numeric_values={"amount": "log"})
    original = TransformerSeqEncoder(trx_encoder=trx, n_heads=2, dim_hidden=32, n_layers=2).eval()
    dm = lifestream.target_datamodule(num_clients=40, min_len=6, max_len=16, batch_size=8, seed=0)
    calibration = [x for x, _ in dm.train_dataloader()][:4]
    held_out = [x for x, _ in dm.val_dataloader()] + [x for x, _ in dm.test_dataloader()]

    def error(model):
        with torch.no_grad():
            out, ref = (torch.cat([m(x) for x in held_out]) for m in (model, original))
        return float((out - ref).norm() / ref.norm())

    pruned = []
    for rec in (None, Reconstruction(original, calibration)):
        work = copy.deepcopy(original)
        with pytest.warns(PruningWarning):
            make_pruner(work, calibration[0], label="t", ratio=0.5, reconstruction=rec).step(History(), 1)
        assert [layer.linear1.out_features for layer in work.seq_encoder.enc.layers] == [16, 16]
        pruned.append(work.eval())
    assert error(pruned[1]) < 0.5 * error(pruned[0])

"""Trainings reused across runs: equal inputs restore the earlier result bit for bit, anything else trains."""
import copy

import torch

from fedcore_adapter.context import NodeContext
from fedcore_adapter.engine import seed_everything
from fedcore_adapter.schema import CommonConfig, TrainParams
from fedcore_adapter.trainer import train
from fedcore_adapter.training_cache import TrainingCache, module_digest
from tests.conftest import TinyDataModule, tiny_mlp

PARAMS = TrainParams(epochs=3, learning_rate=1e-2, progress=False)


def _ctx(model, tmp_path, cache, **common):
    dm = TinyDataModule()
    return NodeContext(train_loader=dm.train_dataloader(), val_loader=dm.val_dataloader(),
                       test_loader=dm.test_dataloader(), loss_fn=torch.nn.CrossEntropyLoss(),
                       device=torch.device("cpu"), teacher=copy.deepcopy(model).eval(), output_dir=tmp_path,
                       common=CommonConfig(**common), training_cache=cache)


def _counted(model):
    """``model``, and the list its forward calls in training mode append to."""
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1) if m.training else None)
    return model, calls


def _train_from(start, tmp_path, cache, params=PARAMS, seed=7, **kwargs):
    """``start`` trained (a copy) from a fresh seed; the model, its report, the context, the forward calls in
    training mode, and the next random draw after it."""
    model, calls = _counted(copy.deepcopy(start))
    ctx = _ctx(start, tmp_path, cache)
    seed_everything(seed)
    report = train(model, ctx, params, **kwargs)
    return model, report, ctx, calls, torch.rand(3)


def _untimed(history):
    return [{k: v for k, v in row.items() if k != "epoch_s"} for row in history]


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_training_equal_to_an_earlier_one_is_restored_bit_for_bit_and_not_run(tmp_path):
    start = tiny_mlp()
    plain, plain_report, plain_ctx, _, plain_next = _train_from(start, tmp_path, None)
    cache = TrainingCache(tmp_path / "cache")
    first, _, first_ctx, first_calls, _ = _train_from(start, tmp_path, cache)
    again, report, ctx, calls, after = _train_from(start, tmp_path, cache)
    assert first_calls and not first_ctx.notes and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert not calls  # restored: no training step ran
    assert _same_weights(again, plain) and _same_weights(first, plain)
    assert _untimed(report.history) == _untimed(plain_report.history) and report.epochs_run == 3
    assert torch.equal(after, plain_next)  # the random state the training left, restored too,
    batch, plain_batch = next(iter(ctx.train_loader))[0], next(iter(plain_ctx.train_loader))[0]
    assert torch.equal(batch, plain_batch)  # the data loader's own generator included
    assert ctx.notes == ["train: 3 epochs reused from an identical earlier training"]
    assert not again.training


def test_another_start_option_or_random_state_trains_again(tmp_path):
    start = tiny_mlp()
    cache = TrainingCache(tmp_path / "cache")
    _train_from(start, tmp_path, cache)
    other_weights = tiny_mlp()
    with torch.no_grad():
        other_weights.load_state_dict(start.state_dict())
        next(other_weights.parameters()).add_(1e-3)
    faster = PARAMS.model_copy(update={"learning_rate": 2e-2})
    for model, params, seed in [(other_weights, PARAMS, 7), (start, faster, 7), (start, PARAMS, 8)]:
        _, _, ctx, calls, _ = _train_from(model, tmp_path, cache, params=params, seed=seed)
        assert calls and not ctx.notes
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


def test_a_regularizer_without_a_reuse_key_always_trains_and_with_one_is_reused(tmp_path):
    start = tiny_mlp()
    cache = TrainingCache(tmp_path / "cache")

    def l2(model):
        return 1e-3 * sum(p.pow(2).sum() for p in model.parameters())

    for _ in range(2):
        _, _, ctx, calls, _ = _train_from(start, tmp_path, cache, regularizer=l2)
        assert calls and not ctx.notes
    assert not list((tmp_path / "cache").glob("*.pt"))
    runs = [_train_from(start, tmp_path, cache, regularizer=l2, reuse_key={"l2": 1e-3}) for _ in range(2)]
    assert runs[0][3] and not runs[1][3]


def test_intermediate_checkpoints_wanted_train_every_time(tmp_path):
    start = tiny_mlp()
    cache = TrainingCache(tmp_path / "cache")
    for _ in range(2):
        model, calls = _counted(copy.deepcopy(start))
        seed_everything(7)
        train(model, _ctx(start, tmp_path, cache, save_each=1), PARAMS)
        assert calls
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_beyond_its_disk_budget_the_entries_used_longest_ago_go(tmp_path):
    start = tiny_mlp()
    probe = TrainingCache(tmp_path / "probe")
    _train_from(start, tmp_path, probe)
    size = next((tmp_path / "probe").glob("*.pt")).stat().st_size
    cache = TrainingCache(tmp_path / "cache", max_bytes=int(size * 2.5))
    for seed in (1, 2, 3):
        _train_from(start, tmp_path, cache, seed=seed)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    _, _, _, calls, _ = _train_from(start, tmp_path, cache, seed=1)  # the oldest was removed: trained again
    assert calls
    _, _, _, calls, _ = _train_from(start, tmp_path, cache, seed=3)
    assert not calls


def test_a_model_with_packed_int8_weights_is_never_digested():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert module_digest(model) is not None
    assert module_digest(quantized) is None

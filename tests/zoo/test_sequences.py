"""The event-sequence encoder example: generated data, the GRU classifier, its configs, and COMPOSITE_1 on it."""
import numpy as np
import pytest
import torch

from fedcore_adapter.data import call_model, split_batch
from fedcore_adapter.zoo.sequences import EventSequenceDataModule, SeqGRUClassifier, generate_event_sequences


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_dm():
    return EventSequenceDataModule(num_samples=300, batch_size=32, eval_batch_size=64, n_folds=3)


def test_generated_sequences_are_padded_after_their_length_and_reproducible():
    a = generate_event_sequences(50, min_len=4, max_len=12, seed=3)
    b = generate_event_sequences(50, min_len=4, max_len=12, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["event_type"].shape == (50, 12) and a["amount"].dtype == np.float32
    real = np.arange(12)[None] < a["seq_len"][:, None]
    assert (a["event_type"][real] >= 1).all() and (a["event_type"][~real] == 0).all()
    assert (a["amount"][~real] == 0).all() and ((a["amount"][real] < 0) == (a["tr_type"][real] == 1)).all()
    assert set(np.unique(a["labels"])) <= {0, 1, 2, 3} and 4 <= a["seq_len"].min() <= a["seq_len"].max() <= 12


def test_batches_are_dicts_of_padded_tensors_with_labels(small_dm):
    batch = next(iter(small_dm.train_dataloader()))
    assert set(batch) == {"event_type", "tr_type", "amount", "seq_len", "labels"}
    assert batch["event_type"].shape == (32, 32) and batch["event_type"].dtype == torch.int64
    assert batch["labels"].shape == (32,)


def test_folds_test_on_disjoint_clients_that_cover_the_dataset():
    tests = [EventSequenceDataModule(num_samples=90, n_folds=3, fold_id=k).test for k in range(3)]
    keys = [{tuple(t.tensors["event_type"][i].tolist()) for i in range(len(t))} for t in tests]
    assert sum(len(t) for t in tests) == 90
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    with pytest.raises(ValueError, match=r"fold_id=3 is outside 0..2"):
        EventSequenceDataModule(num_samples=90, n_folds=3, fold_id=3)


def test_classifier_gives_logits_and_ignores_padding(small_dm):
    torch.manual_seed(0)
    model = SeqGRUClassifier(num_classes=4).eval()
    inputs, _ = split_batch(next(iter(small_dm.test_dataloader())))
    logits = call_model(model, inputs)
    assert logits.shape == (64, 4)
    noisy = dict(inputs)
    pad = torch.arange(32)[None] >= inputs["seq_len"][:, None]
    noisy["event_type"] = torch.where(pad, torch.randint(1, 25, pad.shape), inputs["event_type"])
    noisy["amount"] = torch.where(pad, torch.randn(pad.shape) * 100, inputs["amount"])
    torch.testing.assert_close(call_model(model, noisy), logits)
    embedding = model.seq_encoder({k: v for k, v in inputs.items() if k != "seq_len"}, inputs["seq_len"])
    assert embedding.shape == (64, 64)


def test_classifier_names_missing_fields():
    with pytest.raises(ValueError, match=r"missing \['amount'\]"):
        SeqGRUClassifier()(event_type=torch.ones(2, 3, dtype=torch.long), tr_type=torch.ones(2, 3, dtype=torch.long))


def test_a_short_training_run_learns_the_classes(tmp_path, small_dm):
    from fedcore_adapter import run_setup

    torch.manual_seed(0)
    setup = {"name": "T", "common": {"latency_repeats": 2, "latency_warmup": 1},
             "nodes": [{"kind": "training", "epochs": 4, "learning_rate": 3e-3, "progress": False}]}
    result = run_setup(setup, SeqGRUClassifier(), small_dm, output_dir=tmp_path)
    assert result.metrics[0]["accuracy"] < 0.4 < 0.55 < result.metrics[-1]["accuracy"]


def test_hydra_groups_build_the_model_and_the_data():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fedcore_adapter.resources import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=["model=seq_gru", "data=event_sequences", "tracking=none",
                                                       "data.num_samples=60"])
    model, dm = instantiate(cfg.model), instantiate(cfg.data)
    inputs, target = split_batch(next(iter(dm.val_dataloader())))
    assert call_model(model, inputs).shape == (len(target), cfg.data.num_classes)


def test_composite_1_compresses_the_sequence_encoder_and_the_result_reloads(tmp_path):
    from fedcore_adapter import fedcore_fit, get_experimental_setup, load_model

    dm = EventSequenceDataModule(num_samples=300, batch_size=32, eval_batch_size=64)
    torch.manual_seed(0)
    model = SeqGRUClassifier()
    setup, name = get_experimental_setup("composite_1")
    params = setup["model_params"]
    once = {"epochs": 1, "custom_loss": None}
    params["training_model"]["epochs"] = 2
    params["pruning_model"].update(epochs=1, pruning_iterations=1, finetune_params=once)
    params["low_rank_model"].update(epochs=1, finetune_params=once)
    hidden = model.seq_encoder.rnn.hidden_size
    result = fedcore_fit(model, dm, setup, output_folder=tmp_path / "COMPOSITE_1_seq_gru", limit_train_batches=3,
                         limit_valid_batches=1)
    assert [r["kind"] for r in result.metrics] == ["input", "training", "pruning", "low_rank", "pruning"]
    assert result.optimised_model.seq_encoder.rnn.hidden_size < hidden  # the GRU's hidden units are pruned
    assert result.metrics[-1]["params"] < 0.9 * result.metrics[0]["params"]
    assert result.metrics[-1]["macs"] < result.metrics[0]["macs"]
    reloaded = load_model(result.output_dir, SeqGRUClassifier())
    inputs, _ = split_batch(next(iter(dm.test_dataloader())))
    torch.testing.assert_close(call_model(reloaded, inputs), call_model(result.optimised_model.eval(), inputs))

"""The FedCore adapter's four functions behave as the seed's, with the seed's known defects fixed."""
import copy
import json
import re
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore_adapter import eval_computational_metrics, extract_loss, fedcore_fit, get_experimental_setup
from fedcore_adapter.api import resolve_loss
from fedcore_adapter.context import SequentialExecutor
from fedcore_adapter.errors import ConfigError, DataError
from fedcore_adapter.building import resolve_setup as load_setup
from fedcore_adapter.setups import named_setups
from tests.conftest import TinyDataModule, tiny_mlp

SEED_KEYS = {"compression_task", "need_pretrain", "common", "model_params", "initial_assumption"}


pytestmark = pytest.mark.usefixtures("one_thread")


def raw_setup(epochs: int = 1) -> dict:
    setup, _ = get_experimental_setup("RAW")
    setup["model_params"]["training_model"].update(epochs=epochs, progress=False)
    setup["common"]["save_each"] = -1
    return setup


# -- get_experimental_setup ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["RAW", "raw", "Raw"])
def test_a_named_setup_comes_in_the_fedcore_format_whatever_the_case(spelling):
    setup, name = get_experimental_setup(spelling)
    assert name == "RAW" and SEED_KEYS <= set(setup)
    assert setup["initial_assumption"] == ["training_model"]
    assert setup["model_params"]["training_model"]["epochs"] == 100 and setup["common"]["save_each"] == 10


@pytest.mark.parametrize("name", sorted(named_setups()))
def test_every_named_setup_converts_to_exactly_its_definition(name):
    setup, got = get_experimental_setup(name.lower())
    assert got == name
    assert load_setup(setup).model_dump(exclude={"description"}) == load_setup(name).model_dump(exclude={"description"})


def test_each_call_gives_a_fresh_dict():
    first, _ = get_experimental_setup("RAW")
    first["model_params"]["training_model"]["epochs"] = 1
    assert get_experimental_setup("RAW")[0]["model_params"]["training_model"]["epochs"] == 100


def test_none_gives_an_empty_default():
    assert get_experimental_setup(None) == ({}, "default")


def test_setup_files_are_named_by_their_stem_in_either_format(tmp_path):
    fedcore = {"compression_task": "composite_compression", "model_params": {"training_model": {"epochs": 3}},
               "initial_assumption": ["training_model"]}
    (tmp_path / "mine.json").write_text(json.dumps(fedcore))
    (tmp_path / "native.yaml").write_text("nodes:\n  - kind: training\n    epochs: 2\n")
    assert get_experimental_setup(tmp_path / "mine.json") == (fedcore, "mine")
    setup, name = get_experimental_setup(str(tmp_path / "native.yaml"))
    assert name == "native" and setup["model_params"] == {"training_model": {"epochs": 2}}


def test_an_unknown_name_lists_the_named_setups():
    with pytest.raises(ConfigError, match=r"unknown setup 'nope'; named setups: .*RAW"):
        get_experimental_setup("nope")


# -- extract_loss ----------------------------------------------------------------------------------------------
def test_extract_loss_prefers_model_loss_then_underscore_loss_then_the_config():
    model = tiny_mlp()
    assert extract_loss(model) is None
    assert isinstance(extract_loss(model, {"loss": "torch.nn.MSELoss"})(), nn.MSELoss)
    model._loss = nn.L1Loss()
    assert extract_loss(model, {"loss": "torch.nn.MSELoss"})() is model._loss
    model.loss = nn.SmoothL1Loss()
    assert extract_loss(model, {"loss": "torch.nn.MSELoss"})() is model.loss


def test_extract_loss_reads_a_hydra_config_with_a_target():
    from omegaconf import OmegaConf

    conf = OmegaConf.create({"loss": {"_target_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.1}})
    loss = extract_loss(tiny_mlp(), conf)()
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    assert extract_loss(tiny_mlp(), OmegaConf.create({"loss": None})) is None


def test_a_loss_factory_a_class_and_a_function_all_resolve_to_the_loss():
    ce = nn.CrossEntropyLoss()
    assert resolve_loss(lambda: ce) is ce
    assert isinstance(resolve_loss(nn.MSELoss), nn.MSELoss)
    assert resolve_loss(nn.functional.cross_entropy) is nn.functional.cross_entropy


# -- fedcore_fit -----------------------------------------------------------------------------------------------
class HeldOutTest(TinyDataModule):
    """Fails if anything reads the test split while fitting."""

    def test_dataloader(self):
        raise AssertionError("fedcore_fit must not touch the test split")


def test_fedcore_fit_runs_the_setup_into_the_output_folder_and_keeps_the_original(tmp_path):
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    setup = raw_setup(epochs=2)
    setup["output_folder"] = str(tmp_path / "RAW_mlp")  # the seed's entry points set it in the dict
    setup["common"]["batch_limit"], setup["common"]["calib_batch_limit"] = 3, 1
    result = fedcore_fit(model, HeldOutTest(), setup)
    assert result.output_dir == tmp_path / "RAW_mlp" and (tmp_path / "RAW_mlp" / "final" / "state.pt").exists()
    assert result.original_model is model and result.optimised_model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(result.optimised_model[0].weight, model[0].weight)
    assert [r["node"] for r in result.metrics] == ["input", "training"]
    assert result.setup.common.limit_train_batches == 3 and result.setup.common.limit_valid_batches == 1
    assert "training" in result.summary()


def test_batch_limits_and_an_arbitrary_output_folder_are_honoured(tmp_path):
    model, training_steps = tiny_mlp(), []
    model.register_forward_hook(lambda m, i, o: training_steps.append(1) if m.training else None)
    result = fedcore_fit(model, TinyDataModule(), raw_setup(epochs=2), output_folder=tmp_path / "mine",
                         limit_train_batches=2, limit_valid_batches=1, executor=SequentialExecutor(),
                         distributed_compression=True)
    assert len(training_steps) == 2 * 2
    assert result.output_dir == tmp_path / "mine" and result.setup.common.distributed_compression


def test_the_seed_loss_factory_is_the_training_loss(tmp_path):
    calls = []

    class Counting(nn.CrossEntropyLoss):
        def forward(self, out, target):
            calls.append(1)
            return super().forward(out, target)

    class WithLoss(nn.Module):  # a ptls-style module carrying its loss
        def __init__(self):
            super().__init__()
            self.net, self.loss = tiny_mlp(), Counting()

        def forward(self, x):
            return self.net(x)

    model = WithLoss()
    fedcore_fit(model, TinyDataModule(), raw_setup(), loss=extract_loss(model), output_folder=tmp_path / "RAW")
    assert len(calls) >= 6  # 6 training batches, then validation and measurement


def test_need_fedot_pretrain_is_accepted_with_a_warning(tmp_path):
    setup = raw_setup()
    setup["need_fedot_pretrain"] = True
    with pytest.warns(UserWarning, match=r"need_fedot_pretrain=True is accepted for compatibility"):
        result = fedcore_fit(tiny_mlp(), TinyDataModule(), setup, output_folder=tmp_path / "RAW")
    assert len(result.notes) == 1


def test_need_evo_opt_searches_from_the_setups_chain_and_returns_its_best_trial(tmp_path):
    setup = {"name": "TINY", "common": {"latency_repeats": 2, "latency_warmup": 1},
             "nodes": [{"kind": "training", "epochs": 8, "learning_rate": 0.01},
                       {"kind": "pruning", "pruning_ratio": 0.5, "finetune_params": {"epochs": 1}}]}
    result = fedcore_fit(tiny_mlp(), TinyDataModule(), setup, output_folder=tmp_path / "TINY", need_evo_opt=True,
                         search={"trials": 2, "objectives": ["params", "accuracy"], "max_accuracy_drop": 0.5,
                                 "moves": {"insert": []}})
    assert result.output_dir == tmp_path / "SEARCH_TINY_Sequential"
    assert (result.output_dir / "trials.csv").exists() and result.notes[-1].startswith("best under the constraint")
    assert [n.kind for n in result.setup.nodes] in (["training", "pruning"], ["training"])
    assert result.metrics[-1]["params"] == sum(p.numel() for p in result.optimised_model.parameters())


class NoTrainLoader:
    def val_dataloader(self):
        return []


@pytest.mark.parametrize("dm, setup, kwargs, message", [
    (NoTrainLoader(), raw_setup(), {}, r"data module NoTrainLoader has no train_dataloader\(\)"),
    (TinyDataModule(), {"compression_task": "composite_compression", "model_params": {}}, {},
     r"FedCore setup: missing 'initial_assumption'"),
    (TinyDataModule(), {"initial_assumption": ["training_model", "prunning_model"]}, {},
     r"initial_assumption\[1\] = 'prunning_model' is not a FedCore node; known: distilation_model, .*pruning_model"),
    (TinyDataModule(), {}, {}, r"the experiment setup is empty"),
    (TinyDataModule(), raw_setup(), {"limit_train_batch": 2}, r"unknown option\(s\) \['limit_train_batch'\]"),
    (TinyDataModule(), raw_setup(), {"limit_train_batches": 0}, r"limit_train_batches = 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, dm, setup, kwargs, message):
    model = tiny_mlp()
    with pytest.raises((ConfigError, DataError), match=message) as err:
        fedcore_fit(model, dm, setup, output_folder=tmp_path / "out", **kwargs)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_a_real_lightning_data_module_works(tmp_path):
    lightning = pytest.importorskip("lightning")

    class LitData(lightning.LightningDataModule):
        def setup(self, stage=None):
            self.inner = TinyDataModule()

        def train_dataloader(self):
            return self.inner.train_dataloader()

        def val_dataloader(self):
            return self.inner.val_dataloader()

    class LitNoTrain(lightning.LightningDataModule):
        pass

    result = fedcore_fit(tiny_mlp(), LitData(), raw_setup(), output_folder=tmp_path / "RAW")
    assert result.metrics[-1]["accuracy"] is not None
    with pytest.raises(DataError, match="LitNoTrain has no train_dataloader"):
        fedcore_fit(tiny_mlp(), LitNoTrain(), raw_setup(), output_folder=tmp_path / "RAW2")


# -- eval_computational_metrics --------------------------------------------------------------------------------
class Sleeper(nn.Module):
    """Takes ``ms`` milliseconds per call, whatever the batch size."""

    def __init__(self, ms: float):
        super().__init__()
        self.ms = ms
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        time.sleep(self.ms / 1e3)
        return self.linear(x)


def loader_of(*sizes: int, features: int = 4) -> list:
    return [(torch.randn(n, features), torch.zeros(n, dtype=torch.long)) for n in sizes]


def test_latency_is_milliseconds_per_sample_over_n_batches(tmp_path):
    model = Sleeper(20.0)
    one = eval_computational_metrics(model, loader_of(4, 12), tmp_path / "c.txt", n_batches=1, warmup=1, repeats=3)
    two = eval_computational_metrics(model, loader_of(4, 12), tmp_path / "c.txt", n_batches=2, warmup=1, repeats=3)
    assert 20 / 4 <= one["latency"] < 2 * 20 / 4  # ~5 ms per sample, not 0.005 (seconds printed as ms)
    assert 40 / 16 <= two["latency"] < 2 * 40 / 16
    assert two["throughput"] == pytest.approx(1e3 / two["latency"])


def test_each_call_appends_one_seed_format_line(tmp_path):
    path = tmp_path / "sub" / "computational.txt"
    for run_id in ("a", 7):
        result = eval_computational_metrics(tiny_mlp(), DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4),
                                            path, id=run_id, warmup=1, repeats=2)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("#7 ")
    match = re.fullmatch(r"#a latency: (\S+) throughput: (\S+) model_size: (\S+)", lines[0])
    assert match and float(match[3]) == pytest.approx(result["model_size"], rel=1e-4)


def test_model_size_counts_packed_int8_weights(tmp_path):
    from fedcore_adapter.metrics import MB, state_dict_bytes

    fp32 = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    data = loader_of(8, features=256)
    size = {name: eval_computational_metrics(m, data, tmp_path / "c.txt", warmup=1, repeats=2)["model_size"]
            for name, m in (("fp32", fp32), ("int8", int8))}
    assert size["fp32"] == pytest.approx(state_dict_bytes(fp32) / MB)
    assert 0.2 * size["fp32"] < size["int8"] < 0.35 * size["fp32"]  # 1 byte per weight (+ scales), not 0 or 4


def test_n_batches_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"n_batches=0 must be a positive int"):
        eval_computational_metrics(tiny_mlp(), loader_of(4), tmp_path / "c.txt", n_batches=0)
    assert not (tmp_path / "c.txt").exists()

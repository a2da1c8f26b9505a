"""The one line a user sees for any error (errors.error_line): what it keeps, what it names, where it stops."""
import pytest

from fedcore_adapter.errors import ConfigError, RunError, error_line
from fedcore_adapter.resources import conf_dir


def raised(fn):
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the error under test
        return err
    raise AssertionError("nothing was raised")


def test_a_multi_line_message_is_one_line_with_single_spaces():
    assert error_line(ValueError("shapes differ:\n  left (3, 4)\n\tright (4, 3)\n")) == \
        "ValueError: shapes differ: left (3, 4) right (4, 3)"


def test_the_packages_own_errors_are_their_message_and_other_errors_are_named_by_type():
    message = "nodes[0].epochs = -1: must be 0 or more"
    assert error_line(ConfigError(message)) == message
    assert error_line(KeyError("no such column")) == "KeyError: 'no such column'"
    assert error_line(KeyError()) == "KeyError"  # no message: the type alone


def test_a_missing_file_or_package_speaks_for_itself():
    assert error_line(FileNotFoundError(2, "No such file or directory", "weights.pt")) == \
        "[Errno 2] No such file or directory: 'weights.pt'"
    assert error_line(ModuleNotFoundError("No module named 'my_pkg'")) == "No module named 'my_pkg'"


def test_the_caller_may_always_or_never_name_the_type():
    assert error_line(ConfigError("bad"), typed=True) == "ConfigError: bad"
    refused = ConnectionRefusedError(111, "Connection refused")
    assert error_line(refused, typed=False) == "[Errno 111] Connection refused"
    assert error_line(ValueError(), typed=False) == "ValueError"


def test_a_hydra_error_keeps_what_to_choose_from_and_drops_the_search_path():
    from hydra import compose, initialize_config_dir

    def bad_option():
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            compose(config_name="config", overrides=["model=nope"])

    err = raised(bad_option)
    assert "Config search path" in str(err) and "\n" in str(err)  # what Hydra says, the line leaves out
    line = error_line(err)
    assert line.startswith("In 'config': Could not find 'model/nope' Available options in 'model': custom ")
    assert "mnist1d_cnn" in line and "provider=" not in line and type(err).__name__ not in line


def test_an_error_raised_from_another_names_its_root_cause():
    def load():
        try:
            try:
                raise OSError("No space left on device")
            except OSError as disk:
                raise ValueError("could not write the checkpoint") from disk
        except ValueError as write:
            raise RuntimeError("could not save node 2") from write

    assert error_line(raised(load)) == "RuntimeError: could not save node 2; cause: OSError: No space left on device"


def test_a_hydra_error_names_the_cause_hydra_keeps_for_its_full_traceback():
    from hydra.utils import instantiate

    err = raised(lambda: instantiate({"_target_": "fedcore_adapter.no_such_module.build"}))
    assert "HYDRA_FULL_ERROR" in str(err)
    assert error_line(err) == ("Error locating target 'fedcore_adapter.no_such_module.build'; "
                               "cause: No module named 'fedcore_adapter.no_such_module'")


def test_a_cause_the_message_already_says_is_not_repeated():
    def load():
        try:
            raise KeyError("weight")
        except KeyError as err:
            raise RuntimeError(f"state dict is missing {err}") from err

    assert error_line(raised(load)) == "RuntimeError: state dict is missing 'weight'"


def test_the_packages_own_error_is_its_message_alone_even_with_a_cause():
    def run():
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError as err:
            raise RunError("node 1 (training) failed: ZeroDivisionError: division by zero; fix the model") from err

    assert error_line(raised(run)) == "node 1 (training) failed: ZeroDivisionError: division by zero; fix the model"


def test_an_error_caught_while_handling_another_names_no_cause():
    def cleanup():
        try:
            raise OSError("disk full")
        except OSError:
            raise ValueError("cleanup failed")  # noqa: B904 - an implicit context, not a cause

    assert error_line(raised(cleanup)) == "ValueError: cleanup failed"


@pytest.mark.parametrize("limit", [40, 300])
def test_a_limit_bounds_the_line_and_marks_the_cut(limit):
    line = error_line(ValueError("x" * 1000), limit=limit)
    assert len(line) == limit and line.startswith("ValueError: xxx") and line.endswith("x...")
    assert error_line(ValueError("short"), limit=limit) == "ValueError: short"


def test_a_cycle_of_causes_still_ends_in_one_line():
    first, second = ValueError("first"), KeyError("second")
    first.__cause__, second.__cause__ = second, first
    assert error_line(first).startswith("ValueError: first")

"""Bad config is refused before anything runs, with the valid choices in the message."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_pipeline, seed_store, shared_data


def _data_command(overrides: list[str]) -> tuple[str, ...] | None:
    """The data cases run the train stage (ml-100k from the shared data folder; None where it is absent)."""
    if "data=ml-100k" in overrides:
        if not (shared_data() / "ml-100k").is_dir():
            return None
        overrides = [*overrides, f"data.root={shared_data()}"]
    return (*overrides, "stage=train")


# The command line (less artifacts_dir) that each test of this module gives `python -m pipeline`, from its parameters.
COMMANDS = {
    "test_bad_config_exits_nonzero_with_choices": lambda params: (params["override"],),
    "test_config_error_lists_model_options": lambda params: ("model=transformerxl",),
    "test_unknown_keys_are_one_message_naming_the_valid_ones": lambda params: tuple(params["overrides"]),
    "test_data_config_errors_are_one_message": lambda params: _data_command(params["overrides"]),
}


@pytest.fixture(scope="module")
def refusals(request, tmp_path_factory, store_template):
    """What `python -m pipeline` answers to the command of each test collected from this module: each in a fresh
    process, as a user runs it, with a folder of its own as artifacts_dir. The processes run side by side: they
    spend their seconds importing. The data cases fail in the train stage, after the run started: their
    folder holds an MLflow store already (conftest.seed_store)."""
    commands = []
    for item in request.session.items:
        if item.module is request.module and "refusals" in item.fixturenames:
            callspec = getattr(item, "callspec", None)
            command = COMMANDS[item.originalname](callspec.params if callspec else {})
            if command is not None and command not in commands:
                commands.append(command)
    folders = [tmp_path_factory.mktemp("config") for _ in commands]
    for command, folder in zip(commands, folders):
        if "stage=train" in command:
            seed_store(store_template, folder)

    def run(command, folder):
        return folder, run_pipeline([*command, f"artifacts_dir={folder}"], cwd=folder)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(zip(commands, pool.map(run, commands, folders)))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("precision=fp8", "fp32, fp16, bf16, int8"),
        ("device=tpu", "auto, cpu, cuda"),
        ("stage=bogus", "train, compile, trt, onnx, int8, validate, promote, deploy"),
        ("stage=[train,bogus]", "unknown stage 'bogus'"),
        ("model=transformerxl", "hstu"),
        ("data=netflix", "ml-1m"),
        ("train.learning_rat=0.1", "learning_rat"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_config_exits_nonzero_with_choices(refusals, override, expected):
    folder, result = refusals[COMMANDS["test_bad_config_exits_nonzero_with_choices"]({"override": override})]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert expected in output, output
    assert not (folder / "mlflow.db").exists(), "a refused config must not create runs"


def test_config_error_lists_model_options(refusals):
    _, result = refusals[COMMANDS["test_config_error_lists_model_options"]({})]
    output = result.stdout + result.stderr
    assert "sasrec" in output and "hstu" in output, output


def _one_clear_error(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 4, output
    return output


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trian.epochs=3"], "no key 'trian'; valid keys: data, model, train"),
        # Hydra's own hint for the line above: accepted by Hydra, read by nothing.
        (["+trian.epochs=3"], "no key 'trian'; valid keys: data, model, train"),
        (["+train.epochz=3"], "train has no key 'epochz'; valid keys of train: epochs, batch_size, lr"),
        (["data=ml-100k", "data.synthetic.num_users=3"], "valid keys of data: name, root, download, min_rating"),
        (["+train.epochs=3"], "without +"),
        (["model=transformerxl"], "unknown model 'transformerxl'; valid choices: hstu, sasrec"),
    ],
)
def test_unknown_keys_are_one_message_naming_the_valid_ones(refusals, overrides, expected):
    folder, result = refusals[COMMANDS["test_unknown_keys_are_one_message_naming_the_valid_ones"]({"overrides": overrides})]
    output = _one_clear_error(result)
    assert expected in output, output
    assert not (folder / "mlflow.db").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.name=mydata"], "unknown dataset 'mydata'; valid names: synthetic, ml-1m, ml-100k"),
        (["data=amazon-beauty", "data.min_rating=4"], "amazon-beauty has no ratings"),
        (["data=ml-100k", "data.min_rating=9", "data.download=false"], "its ratings run from 1 to 5"),
    ],
)
def test_data_config_errors_are_one_message(refusals, overrides, expected):
    command = COMMANDS["test_data_config_errors_are_one_message"]({"overrides": overrides})
    if command is None:
        pytest.skip("ml-100k is not in the shared data folder")
    _, result = refusals[command]
    output = _one_clear_error(result)
    assert expected in output, output

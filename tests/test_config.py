"""Tests for the files in configs/ and bacon_jax.config_lib (SPEC 6, 9; STYLE "Configs are data").

Config files are loaded by path, as `--config=configs/<name>.py:<arg>` does, and every file and
preset must parse and validate. The resolved values are checked against the tables of SPEC 9.1 and
9.2 (and SPEC 6 for DM).
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from bacon_jax import config_lib, data, distill, models
from tests.subprocess_env import subprocess_env

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
# Every config file, found on disk so that a new one is covered automatically.
CONFIG_NAMES = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.py")))
EXPECTED_NAMES = (
    "digits",
    "default",
    "mnist",
    "fashion_mnist",
    "svhn",
    "cifar10",
    "cifar100",
    "tiny_imagenet",
)
# Files that reproduce a reference setting (SPEC 9.2, A6); digits/default are CPU-sized extras.
REFERENCE_DATASETS = ("mnist", "fashion_mnist", "svhn", "cifar10", "cifar100", "tiny_imagenet")


def load_module(name):
    """Imports configs/<name>.py by path (the config files are not a package)."""
    path = CONFIG_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"test_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(name, arg=None):
    return load_module(name).get_config(arg)


def test_expected_config_files_exist():
    assert set(EXPECTED_NAMES) <= set(CONFIG_NAMES)


def _presets(name):
    return sorted(getattr(load_module(name), "PRESETS", {}))


ALL_ARGS = [(name, None) for name in CONFIG_NAMES] + [
    (name, preset) for name in CONFIG_NAMES for preset in _presets(name)
]


@pytest.mark.parametrize("name,arg", ALL_ARGS)
def test_every_file_and_preset_parses_and_validates(name, arg):
    config = get_config(name, arg)
    assert config_lib.validate(config) is config
    if arg is not None and arg.removeprefix("ipc").isdigit():
        assert config.ipc == int(arg.removeprefix("ipc"))
    assert config.dataset.name in data.DATASETS


@pytest.mark.parametrize("name", REFERENCE_DATASETS + ("digits",))
def test_reference_files_define_ipc_presets(name):
    assert {"ipc1", "ipc10", "ipc50"} <= set(_presets(name))


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("method", config_lib.METHODS)
def test_every_method_validates(name, method):
    config = get_config(name, f"method={method}")
    config_lib.validate(config)
    assert config.method == method


@pytest.mark.parametrize("name", REFERENCE_DATASETS)
def test_dataset_name_matches_file(name):
    assert get_config(name, "ipc10").dataset.name == name


def test_contract_fields_exist():
    config = get_config("cifar10", "ipc10")
    for field in (
        "method",
        "dataset.name",
        "ipc",
        "iterations",
        "lr_img",
        "batch_real",
        "seed",
        "num_exp",
        "eval.num_eval",
        "eval.epochs",
        "eval.every",
        "eval.models",
    ):
        node = config
        for part in field.split("."):
            assert part in node, f"contract field {field!r} missing"
            node = node[part]
    assert isinstance(config.eval.models, (tuple, list))
    assert all(name in models.MODEL_NAMES for name in config.eval.models)


# --------------------------------------------------------------------------------------------------
# Reference values (SPEC 9.1, 9.2, 6).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REFERENCE_DATASETS)
def test_common_reference_values(name):
    """SPEC 9.1: values shared by every BACON/IDM command."""
    config = get_config(name, "ipc10")
    assert config.method == "bacon"
    assert config.model == "ConvNet"
    assert config.lr_img == pytest.approx(0.2)
    assert config.iterations == 20000
    assert config.num_exp == 5
    assert config.eval.num_eval == 5
    assert config.eval.epochs == 1000
    assert tuple(config.eval.models) == ("ConvNet",)
    assert config.eval.lr == pytest.approx(0.01)
    assert config.eval.batch_size == 256
    assert config.expand is True
    assert config.dsa is True
    assert tuple(config.dsa_families) == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert config.image_update == "per_class"
    assert config.syn_ce is True
    assert config.train_net_num == 1
    assert config.fetch_net_num == 2
    assert config.trained_bs == 256
    assert config.net_num == 100
    assert config.initial_nets == 3
    assert config.lr_net == pytest.approx(0.01)
    assert config.net_momentum == pytest.approx(0.9)
    assert config.net_weight_decay == pytest.approx(5e-4)


# (file, preset, method) -> (batch_real, net_generate_interval, eval.every, ce_weight,
# model_train_steps), SPEC 9.2. MNIST/Fashion-MNIST take the SVHN/CIFAR-10 command (A6); SVHN has
# no IDM command, so IDM uses BACON's settings there.
_CIFAR10_LIKE = {
    "ipc1": (5000, 5, 100, 0.5, 10),
    "ipc10": (256, 30, 100, 0.5, 10),
    "ipc50": (256, 30, 500, 0.1, 10),
}
SPEC_9_2 = {}
for _name in ("cifar10", "svhn", "mnist", "fashion_mnist"):
    for _preset, _values in _CIFAR10_LIKE.items():
        for _method in ("bacon", "idm"):
            SPEC_9_2[(_name, _preset, _method)] = _values
SPEC_9_2.update({
    ("cifar100", "ipc1", "bacon"): (5000, 5, 100, 0.5, 10),
    ("cifar100", "ipc10", "bacon"): (256, 30, 100, 0.1, 50),
    ("cifar100", "ipc50", "bacon"): (256, 30, 500, 0.1, 50),
    ("cifar100", "ipc1", "idm"): (5000, 5, 100, 0.5, 10),
    ("cifar100", "ipc10", "idm"): (256, 30, 100, 0.1, 50),
    ("cifar100", "ipc50", "idm"): (256, 30, 500, 0.1, 10),
    ("tiny_imagenet", "ipc1", "bacon"): (256, 30, 100, 0.5, 10),
    ("tiny_imagenet", "ipc10", "bacon"): (256, 30, 500, 0.5, 50),
    ("tiny_imagenet", "ipc1", "idm"): (256, 30, 100, 0.5, 10),
    ("tiny_imagenet", "ipc10", "idm"): (256, 30, 500, 0.5, 10),
    ("tiny_imagenet", "ipc50", "idm"): (256, 30, 1000, 0.8, 50),
})


@pytest.mark.parametrize("name,preset,method", sorted(SPEC_9_2))
def test_setting_specific_values(name, preset, method):
    config = get_config(name, f"{preset},method={method}")
    batch_real, interval, every, ce_weight, steps = SPEC_9_2[(name, preset, method)]
    assert config.method == method
    assert config.ipc == int(preset.removeprefix("ipc"))
    assert config.batch_real == batch_real
    assert config.net_generate_interval == interval
    assert config.eval.every == every
    assert config.ce_weight == pytest.approx(ce_weight)
    assert config.model_train_steps == steps
    # IDM and BACON share everything else (SPEC 5: BACON is IDM with the loss swapped).
    assert config.lr_img == pytest.approx(0.2)
    assert config.expand is True
    assert config.image_update == "per_class"


def test_method_presets_differ_only_where_the_commands_do():
    """Quirk 8: CIFAR-100/50 and Tiny/10 use model_train_steps 50 in BACON but 10 in IDM."""
    assert get_config("cifar100", "ipc50").model_train_steps == 50
    assert get_config("cifar100", "ipc50,method=idm").model_train_steps == 10
    assert get_config("tiny_imagenet", "ipc10").model_train_steps == 50
    assert get_config("tiny_imagenet", "ipc10,method=idm").model_train_steps == 10
    # The method preset must not leak into the other presets of the same file.
    assert get_config("cifar100", "ipc10,method=idm").model_train_steps == 50
    assert get_config("tiny_imagenet", "ipc50,method=idm").model_train_steps == 50
    # A user override still wins over the method preset.
    assert get_config("cifar100", "ipc50,method=idm,model_train_steps=7").model_train_steps == 7


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_dm_method_defaults(name):
    """SPEC 6: DM is lr_img 1, no expansion, one joint image step, no synthetic CE."""
    arg = "ipc10,method=dm" if "ipc10" in _presets(name) else "method=dm"
    config = get_config(name, arg)
    assert config.method == "dm"
    assert config.lr_img == pytest.approx(1.0)
    assert config.expand is False
    assert config.image_update == "joint"
    assert config.syn_ce is False
    assert config.dsa is True  # DM keeps DSA (SPEC 6, the readme command's dsa_strategy)
    config_lib.validate(config)


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("method", config_lib.METHODS)
def test_method_defaults_record_the_method_of_the_argument(name, method):
    arg = f"ipc10,method={method}" if "ipc10" in _presets(name) else f"method={method}"
    config = get_config(name, arg)
    assert config.method_defaults == method
    config_lib.validate(config)


@pytest.mark.parametrize("later", ["dm", "idm"])
def test_method_changed_after_build_is_refused(later):
    """`--config.method=dm` after `:ipc10` (BACON's settings) would run DM with BACON's settings."""
    config = get_config("mnist", "ipc10")
    config.method = later
    with pytest.raises(ValueError) as error:
        config_lib.validate(config)
    message = str(error.value)
    assert f"config.method is '{later}' but the config holds the settings of 'bacon'" in message
    assert f"configs/<dataset>.py:<preset>,method={later}" in message
    config.method_defaults = ""  # no record: BACON's settings under another method, on purpose
    config_lib.validate(config)


# DM (SPEC 6) draws 256 real images per class at every IPC, not the IDM/BACON ipc1 preset's 5000.
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_dm_uses_reference_batch_real_at_ipc1(name):
    assert get_config(name, "ipc1,method=dm").batch_real == 256


def test_random_method_has_no_expansion():
    config = get_config("cifar10", "ipc10,method=random")
    assert config.method == "random"
    assert config.expand is False


def test_bacon_and_idm_defaults():
    for method in ("bacon", "idm"):
        config = get_config("cifar10", f"ipc10,method={method}")
        assert config.lr_img == pytest.approx(0.2)
        assert config.expand is True
        assert config.image_update == "per_class"
        assert config.syn_ce is True


# --------------------------------------------------------------------------------------------------
# Overrides and type conversion.
# --------------------------------------------------------------------------------------------------


def test_user_override_beats_method_default():
    config = get_config("cifar10", "ipc10,method=dm,lr_img=2,image_update=per_class")
    assert config.lr_img == pytest.approx(2.0)
    assert config.image_update == "per_class"
    config = get_config("cifar10", "ipc1,batch_real=64")
    assert config.batch_real == 64


def test_nested_overrides_and_type_conversion():
    config = get_config(
        "cifar10",
        "ipc1, eval.num_eval=1, eval.every=7, lr_img=3, ce_weight=1e-3, eval.intermediate=false,"
        "syn_ce=0, dsa_families=color;crop, eval.models=ConvNet;MLP, dataset.data_dir=/tmp/x",
    )
    assert config.eval.num_eval == 1 and type(config.eval.num_eval) is int
    assert config.eval.every == 7
    assert config.lr_img == 3.0 and type(config.lr_img) is float
    assert config.ce_weight == pytest.approx(1e-3)
    assert config.eval.intermediate is False
    assert config.syn_ce is False
    assert tuple(config.dsa_families) == ("color", "crop")
    assert tuple(config.eval.models) == ("ConvNet", "MLP")
    assert config.dataset.data_dir == "/tmp/x"
    # The preset still applied, and untouched fields keep their values.
    assert config.ipc == 1 and config.batch_real == 5000
    assert config.eval.epochs == 1000
    config_lib.validate(config)


def test_parse_arg():
    assert config_lib.parse_arg(None) == ("", {})
    assert config_lib.parse_arg("ipc10") == ("ipc10", {})
    assert config_lib.parse_arg("ipc10,method=idm,eval.num_eval=1") == (
        "ipc10",
        {"method": "idm", "eval.num_eval": "1"},
    )
    assert config_lib.parse_arg("method=dm") == ("", {"method": "dm"})
    # Values may contain '='.
    assert config_lib.parse_arg("dataset.path=a=b.npz")[1] == {"dataset.path": "a=b.npz"}


@pytest.mark.parametrize(
    "arg,bad",
    [
        ("ipc1,eval.num_eval=many", "many"),
        ("ipc1,eval.intermediate=maybe", "maybe"),
    ],
)
def test_bad_override_values(arg, bad):
    with pytest.raises(ValueError, match=bad):
        get_config("cifar10", arg)


@pytest.mark.parametrize("arg,needle", [("ipc1,iterations=abc", "iterations='abc': expected an integer"),
                                        ("ipc1,lr_img=fast", "lr_img='fast': expected a number")])
def test_bad_numbers_name_the_field_and_type(arg, needle):
    with pytest.raises(ValueError, match=needle):
        get_config("cifar10", arg)


def test_preset_for_a_file_without_presets():
    message = _error(lambda: get_config("default", "ipc10"))
    assert "'ipc10'" in message and "no presets" in message and "configs/mnist.py:ipc10" in message


# --------------------------------------------------------------------------------------------------
# Errors name the bad value and the allowed ones.
# --------------------------------------------------------------------------------------------------


def _error(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def test_unknown_preset():
    message = _error(lambda: get_config("cifar10", "ipc7"))
    assert "ipc7" in message
    for allowed in ("ipc1", "ipc10", "ipc50"):
        assert allowed in message


def test_two_presets():
    message = _error(lambda: get_config("cifar10", "ipc1,ipc10"))
    assert "ipc1" in message and "ipc10" in message


def test_unknown_method():
    message = _error(lambda: get_config("cifar10", "ipc10,method=dc"))
    assert "'dc'" in message
    for allowed in config_lib.METHODS:
        assert allowed in message


def test_unknown_dataset():
    config = get_config("cifar10", "ipc10,dataset.name=imagenet")
    message = _error(lambda: config_lib.validate(config))
    assert "imagenet" in message
    for allowed in data.DATASETS:
        assert allowed in message


def test_unknown_ipc():
    config = get_config("cifar10", "ipc10,ipc=7")
    message = _error(lambda: config_lib.validate(config))
    assert "7" in message
    for allowed in ("1", "10", "50"):
        assert allowed in message


@pytest.mark.parametrize("field", ["model", "eval.models"])
def test_unknown_architecture(field):
    config = get_config("cifar10", f"ipc10,{field}=ConvNetXL")
    message = _error(lambda: config_lib.validate(config))
    assert "ConvNetXL" in message
    for allowed in ("ConvNet", "ResNet18", "VGG11", "MLP"):
        assert allowed in message


def test_unknown_image_update():
    config = get_config("cifar10", "ipc10,image_update=sometimes")
    message = _error(lambda: config_lib.validate(config))
    assert "sometimes" in message and "per_class" in message and "joint" in message


def test_unknown_field():
    message = _error(lambda: get_config("cifar10", "ipc10,eval.num_evals=3"))
    assert "'eval.num_evals'" in message and "fields at eval" in message and "'epochs'" in message
    message = _error(lambda: get_config("cifar10", "ipc10,evaluation.every=3"))
    assert "'evaluation.every'" in message and "fields at the top level" in message
    assert "'dsa_families'" in message


@pytest.mark.parametrize("flags", [
    ["--config.eval.num_evals=1"],
    ["--config.eval.num_evals", "1"],
    ["-config.eval.num_evals=1"],
    ["--noconfig.eval.num_evals"],
])
def test_unknown_field_given_as_a_flag(flags):
    config_flag = f"--config={CONFIG_DIR / 'cifar10.py'}:ipc10,method=dm"
    message = _error(lambda: config_lib.check_config_flags(["run.py", config_flag, *flags]))
    assert "'eval.num_evals'" in message and "fields at eval" in message and "'epochs'" in message


def test_known_fields_given_as_flags_pass_the_check(tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("--config.eval.num_eval=1\n")
    config_lib.check_config_flags(["run.py", "-config", f"{CONFIG_DIR / 'cifar10.py'}:ipc10",
                                   "--config.lr_img", "2", "--noconfig.syn_ce",
                                   f"--flagfile={flagfile}"])
    flagfile.write_text("--config.eval.num_evals=1\n")
    message = _error(lambda: config_lib.check_config_flags(
        ["run.py", f"--config={CONFIG_DIR / 'cifar10.py'}", f"--flagfile={flagfile}"]))
    assert "'eval.num_evals'" in message
    message = _error(lambda: config_lib.check_config_flags(
        ["run.py", "--config", f"{CONFIG_DIR / 'cifar10.py'}:ipc10", "--config.lr_img.x", "2"]))
    assert "'lr_img.x'" in message and "'lr_img' is a value" in message


@pytest.mark.parametrize("flags, refused", [
    (["--config.method=dm"], True),  # DM with BACON's settings
    (["--config.method", "idm"], True),
    (["--config.method=bacon"], False),  # the method the settings are for
    (["--config.method=dm", "--config.method_defaults="], False),  # a deliberate mix, on record
])
def test_method_given_as_a_flag(flags, refused):
    argv = ["run.py", f"--config={CONFIG_DIR / 'mnist.py'}:ipc10", *flags]
    if refused:
        message = _error(lambda: config_lib.check_config_flags(argv))
        assert "the config holds the settings of 'bacon'" in message
        assert "configs/<dataset>.py:<preset>,method=" in message
    else:
        config_lib.check_config_flags(argv)
    message = _error(lambda: config_lib.check_config_flags([*argv[:2], "--config.method=BACON"]))
    assert "Unknown method 'BACON'" in message


def test_method_changed_in_python_is_refused_by_spec_from_config():
    config = get_config("digits", "ipc10")  # DM's settings
    config.method = "bacon"
    with pytest.raises(ValueError, match="holds the settings of 'dm'"):
        distill.spec_from_config(config, data.DATASETS["digits"], 100)
    config.method_defaults = ""  # no record: a deliberate mix passes
    assert distill.spec_from_config(config, data.DATASETS["digits"], 100).method == "bacon"


@pytest.mark.parametrize("arg, flags, message", [
    ("ipc10", ["--config.bogus=1"], "Unknown config field 'bogus'"),
    ("ipc10", ["--config.eval.num_eval=0"], "eval.num_eval must be >= 1"),  # validate()
    ("ipc10,ipc=7", [], "Unknown ipc 7; allowed: 1, 10, 50"),
])
def test_scripts_report_a_bad_config_flag_without_a_traceback(tmp_path, arg, flags, message):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(CONFIG_DIR.parent / "experiments" / "run.py"),
         f"--config={CONFIG_DIR / 'digits.py'}:{arg}", f"--workdir={workdir}", *flags],
        capture_output=True, text=True, timeout=300, check=False,
        env=subprocess_env(),
    )
    assert result.returncode == 1
    assert f"FATAL Flags parsing error: {message}" in result.stderr
    assert "Traceback" not in result.stderr and not workdir.exists()


@pytest.mark.parametrize(
    "arg,needle",
    [
        ("ipc10,iterations=-1", "iterations"),
        ("ipc10,eval.every=0", "eval.every"),
        ("ipc10,eval.num_eval=0", "eval.num_eval must be >= 1"),
        ("ipc10,num_exp=0", "num_exp must be >= 1"),
        ("ipc10,train_net_num=2", "train_net_num"),
        ("ipc10,fetch_net_num=5", "fetch_net_num"),
        ("ipc10,checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
        ("ipc10,log_every=0", "log_every must be >= 1, got 0"),
        ("ipc10,lr_img=-1", "lr_img must be > 0, got -1.0"),
        ("ipc10,net_momentum=1", "net_momentum must be in [0, 1), got 1.0"),
    ],
)
def test_validate_rejects_bad_numbers(arg, needle):
    config = get_config("cifar10", arg)
    assert needle in _error(lambda: config_lib.validate(config))


def _numeric_fields(config):
    return [field for field in config_lib.leaf_fields(config)
            if isinstance(config_lib.lookup(config, field), (int, float))
            and not isinstance(config_lib.lookup(config, field), bool)]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_numeric_field_has_a_range(name):
    assert set(_numeric_fields(get_config(name))) <= set(config_lib.NUMERIC_RANGES)
    assert set(config_lib.NUMERIC_RANGES) <= set(config_lib.leaf_fields(get_config(name)))


@pytest.mark.parametrize("field", sorted(config_lib.NUMERIC_RANGES))
def test_every_numeric_field_is_range_checked(field):
    config = get_config("default")
    node, leaf = config_lib._field_parent(config, field)  # pylint: disable=protected-access
    bad_values = [-1] if isinstance(node[leaf], int) else [-1.0, float("nan"), float("inf")]
    for bad in bad_values:
        node[leaf] = bad
        assert _error(lambda: config_lib.validate(config)).startswith(f"{field} must be ")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_field_says_how_it_may_change_on_a_rerun(name):
    fields = set(config_lib.leaf_fields(get_config(name)))
    assert fields == set(config_lib.RERUN_FIELDS)  # a new field must be classified
    kinds = {config_lib.NEUTRAL, config_lib.EVALUATION, config_lib.GROW, config_lib.MATCH}
    assert set(config_lib.RERUN_FIELDS.values()) <= kinds


def test_rerun_differences():
    saved = json.loads(json.dumps(config_lib.to_dict(get_config("digits", "ipc10"))))
    rerun = get_config("digits", "ipc10,iterations=400,num_exp=3,eval.num_eval=1,log_every=1,"
                                 "num_devices=2,dataset.data_dir=/elsewhere")
    assert config_lib.rerun_differences(saved, rerun) == []  # grown, re-evaluated, neutral
    rerun = get_config("digits", "ipc10,iterations=100,lr_img=5,eval.every=7,dsa_families=flip")
    assert config_lib.rerun_differences(saved, rerun) == [
        ("dsa_families", list(saved["dsa_families"]), ["flip"]), ("eval.every", 2000, 7),
        ("iterations", 200, 100), ("lr_img", 1.0, 5.0)]
    del saved["cmi"]  # a config.json written before a field existed: that field is not compared
    assert config_lib.rerun_differences(saved, get_config("digits", "ipc10,cmi.weight=3")) == []


def test_help_lists_what_the_code_accepts():
    text = config_lib.describe_configs(str(CONFIG_DIR))
    for name in CONFIG_NAMES:
        assert f"{name}.py: presets {', '.join(_presets(name)) or 'none'}" in text
    for names in (data.DATASETS, config_lib.METHODS, models.MODEL_NAMES):
        assert ", ".join(names) in text
    base = load_module("default").get_base_config()
    for field in config_lib.leaf_fields(base):
        assert f"  {field} = {config_lib.lookup(base, field)!r}" in text
    assert "  lr_img = 0.2  # contract: image learning rate" in text


def test_missing_config_file_lists_the_available_ones(tmp_path):
    message = _error(lambda: config_lib.check_config_flags(
        ["run.py", f"--config={CONFIG_DIR / 'mnsit.py'}:ipc10"]))
    assert "mnsit.py' does not exist; available: " in message
    assert all(f"{name}.py" in message for name in CONFIG_NAMES)
    message = _error(lambda: config_lib.check_config_flags(
        [str(CONFIG_DIR.parent / "experiments" / "run.py"), f"--config={tmp_path / 'x.py'}"]))
    assert "mnist.py" in message  # the configs beside the scripts
    message = _error(lambda: config_lib.check_config_flags(
        ["run.py", f"--config={CONFIG_DIR / 'mnist.py'}:ipc7"]))
    assert "Unknown preset 'ipc7'" in message


# SPEC 7.3: the reference's per-setting lambdas (DM: main_DM comments; IDM/BACON: IDC's per-class
# values, A8). MNIST/Fashion-MNIST take CIFAR-10's, Tiny ImageNet CIFAR-100's.
@pytest.mark.parametrize("name, preset, method, weight", [
    ("svhn", "ipc10", "dm", 18000.0), ("svhn", "ipc50", "dm", 500.0),
    ("cifar10", "ipc10", "dm", 8000.0), ("cifar10", "ipc50", "dm", 2000.0),
    ("cifar100", "ipc10", "dm", 2000.0), ("cifar100", "ipc50", "dm", 500.0),
    ("svhn", "ipc10", "bacon", 50.0), ("cifar10", "ipc10", "idm", 100.0),
    ("cifar10", "ipc50", "bacon", 50.0), ("cifar100", "ipc50", "idm", 50.0),
    ("mnist", "ipc10", "dm", 8000.0), ("fashion_mnist", "ipc50", "bacon", 50.0),
    ("tiny_imagenet", "ipc10", "bacon", 100.0),
    # No table entry: the defaults.
    ("cifar10", "ipc1", "dm", 8000.0), ("cifar10", "ipc1", "bacon", 100.0),
    ("digits", "ipc10", "bacon", 100.0),
])
def test_cmi_on_sets_the_settings_weight(name, preset, method, weight):
    assert get_config(name, f"{preset},method={method}").cmi.weight == 0.0  # off by default
    config = get_config(name, f"{preset},method={method},cmi=on")
    assert config.cmi.weight == weight
    config_lib.validate(config)


def test_cmi_switch_errors_and_explicit_weight_wins():
    assert get_config("cifar10", "ipc10,cmi=on,cmi.weight=7").cmi.weight == 7.0
    assert get_config("cifar10", "ipc10,cmi=off").cmi.weight == 0.0
    message = _error(lambda: get_config("cifar10", "ipc10,cmi=maybe"))
    assert "maybe" in message and "on" in message and "off" in message
    message = _error(lambda: get_config("cifar10", "ipc10,method=random,cmi=on"))
    assert "random" in message

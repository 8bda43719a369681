"""Helpers for the ml-collections config files in `configs/`.

A config file is loaded as `configs/<dataset>.py:<arg>`, where `arg` is a preset name optionally
followed by comma-separated overrides, e.g. `ipc10` or `ipc10,method=idm,iterations=200`
(big_vision's `parse_arg` idea). Dotted keys reach nested fields: `ipc1,eval.num_eval=1`.
"""

import glob
import json
import math
import os
import re
import sys

import ml_collections

from bacon_jax import errors

METHODS = ("random", "dm", "idm", "bacon", "herding", "kcenter")
# Methods that select real images instead of distilling (no iterations): random real images and
# the coreset baselines of coreset.py.
SELECTION_METHODS = ("random", "herding", "kcenter")
IPCS = (1, 10, 50)
IMAGE_UPDATES = ("per_class", "joint")


def parse_arg(arg):
    """Splits `'ipc10,method=idm'` into the preset name and a dict of override strings.

    Args:
        arg: the text after the first ':' of `--config`, or None.

    Returns:
        (preset, overrides): preset is the first bare token ('' when absent); overrides maps dotted
        field names to their (string) values.
    """
    preset, overrides = "", {}
    for token in (arg or "").split(","):
        token = token.strip()
        if not token:
            continue
        if "=" in token:
            key, value = token.split("=", 1)
            overrides[key.strip()] = value.strip()
        elif preset:
            raise errors.UserError(
                f"Config arg {arg!r} names two presets: {preset!r} and {token!r}.")
        else:
            preset = token
    return preset, overrides


def _convert(text, current, key):
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise errors.UserError(f"Override {key}={text!r}: expected a boolean (true/false).")
        return lowered in ("true", "1")
    if isinstance(current, (int, float)):
        kind = type(current)
        try:
            return kind(text)
        except ValueError:
            raise errors.UserError(
                f"Override {key}={text!r}: expected {'an integer' if kind is int else 'a number'}."
            ) from None
    if isinstance(current, (list, tuple)):
        items = [item for item in text.strip("[]()").replace(";", " ").split() if item]
        return type(current)(item.strip("'\"") for item in items)
    return text


def apply_overrides(config, overrides):
    """Sets dotted fields of `config` from strings, converting to each field's current type.

    Args:
        config: the ConfigDict to modify in place.
        overrides: mapping like {'method': 'idm', 'eval.num_eval': '1'}.

    Returns:
        The same config, for chaining.
    """
    for key, text in overrides.items():
        node, leaf = _field_parent(config, key)
        node[leaf] = _convert(text, node[leaf], key)
    return config


def _field_parent(config, key):
    """(the ConfigDict holding dotted `key`, its last name); a UserError lists the fields there."""
    *parents, leaf = key.split(".")
    node = config
    for depth, name in enumerate(parents + [leaf]):
        where = ".".join(parents[:depth])
        if not isinstance(node, ml_collections.ConfigDict):
            raise errors.UserError(
                f"Unknown config field {key!r}: {where!r} is a value, not a group.")
        if name not in node:
            raise errors.UserError(
                f"Unknown config field {key!r}; fields at {where or 'the top level'}: "
                f"{sorted(node.keys())}.")
        if depth < len(parents):
            node = node[name]
    return node, leaf


def choose(name, value, allowed):
    """Returns `value` if it is in `allowed`, else raises a UserError listing the allowed values."""
    if value not in allowed:
        raise errors.UserError(
            f"Unknown {name} {value!r}; allowed: {', '.join(map(str, allowed))}.")
    return value


# Fields that the reference ties to the method rather than to the dataset (SPEC 6 vs 9.1). They are
# applied after the preset and before the user's overrides, so `ipc10,method=dm,lr_img=2` still works.
# Choose the method in the config argument (`:ipc10,method=dm`), not with `--config.method`, which is
# applied after these defaults.
METHOD_DEFAULTS = {
    "random": {"expand": False},
    # DM (SPEC 6): batch_real 256 at every IPC, evaluation every 2000 iterations (no meters).
    "dm": {"expand": False, "image_update": "joint", "lr_img": 1.0, "syn_ce": False,
           "batch_real": 256, "eval.every": 2000},
    "idm": {},
    "bacon": {},
    "herding": {"expand": False},
    "kcenter": {"expand": False},
}


def _set_fields(config, fields):
    for key, value in fields.items():
        node, leaf = _field_parent(config, key)
        node[leaf] = value


# CMI weights (lambda) when a config file gives none for a setting (SPEC 7.3, A8): DM takes the
# reference's active value; IDM/BACON add the term per class, as IDC does, and take IDC's active
# per-class value.
DEFAULT_CMI_WEIGHTS = {"dm": 8000.0, "idm": 100.0, "bacon": 100.0, "random": 0.0,
                       "herding": 0.0, "kcenter": 0.0}


def cmi_weight(cmi_weights, preset, method):
    """lambda for (preset, method): the config file's table, else DEFAULT_CMI_WEIGHTS[method]."""
    return float((cmi_weights or {}).get((preset, method), DEFAULT_CMI_WEIGHTS[method]))


def build(base, presets, arg, method_presets=None, cmi_weights=None):
    """Applies a preset, the method's defaults, then the overrides of `arg` to `base`.

    The pseudo-override `cmi=on` switches the CMI regularizer on with this setting's weight
    (`cmi_weights`, else DEFAULT_CMI_WEIGHTS); `cmi=off` (the default) leaves it off. An explicit
    `cmi.weight=...` in the same argument wins.

    Args:
        base: the dataset's base ConfigDict.
        presets: mapping preset name -> dict of dotted field values (already typed).
        arg: the `--config` argument after ':' (e.g. 'ipc10,method=idm' or 'ipc10,cmi=on').
        method_presets: optional mapping (preset, method) -> dict of field values, for settings
            where a method's reference command differs (e.g. IDM's model_train_steps).
        cmi_weights: optional mapping (preset, method) -> the CMI weight lambda of that setting.

    Returns:
        The configured ConfigDict.
    """
    preset, overrides = parse_arg(arg)
    cmi_switch = choose("cmi switch", overrides.pop("cmi", "off").lower(), ("on", "off"))
    if preset:
        if not presets:
            raise errors.UserError(
                f"Preset {preset!r} given, but this config file has no presets; use a "
                "dataset's file, e.g. configs/mnist.py:ipc10.")
        _set_fields(base, presets[choose("preset", preset, tuple(presets))])
    method = choose("method", overrides.get("method", base.method), METHODS)
    _set_fields(base, METHOD_DEFAULTS[method])
    _set_fields(base, (method_presets or {}).get((preset, method), {}))
    base.method_defaults = method
    if cmi_switch == "on":
        if method in SELECTION_METHODS:
            raise errors.UserError(
                f"cmi=on needs a distillation method (dm, idm, bacon), not {method}.")
        base.cmi.weight = cmi_weight(cmi_weights, preset, method)
    apply_overrides(base, overrides)
    return base


def check_method_defaults(config):
    """Raises UserError when `config.method` was changed after the method's settings were applied.

    `build` applies the method's reference settings (METHOD_DEFAULTS, the config file's per-method
    values) for the `method=` of the config argument and records it in `config.method_defaults`.
    Setting `config.method` later (`--config.method=dm`, or in Python) would keep the first
    method's settings: DM with BACON's expansion, per-class update and image learning rate.
    """
    recorded = config.get("method_defaults")
    if recorded and recorded != config.method:
        raise errors.UserError(
            f"config.method is {config.method!r} but the config holds the settings of "
            f"{recorded!r} (config.method_defaults). Choose the method in the config argument: "
            f"--config=configs/<dataset>.py:<preset>,method={config.method}, or in Python "
            f"load_config_file(path, '<preset>,method={config.method}'). To keep the settings of "
            f"{recorded} under method {config.method} on purpose, also set method_defaults='' "
            f"(no record)."
        )


def _at_least(bound):
    return (lambda value: value >= bound), f">= {bound}"


_POSITIVE = (lambda value: value > 0), "> 0"
_MOMENTUM = (lambda value: 0 <= value < 1), "in [0, 1)"
_SEED = (lambda value: 0 <= value < 2**32), "in [0, 2**32)"

# The allowed range of every numeric field (bools are not numbers here): field -> (predicate,
# description). `validate` checks each; NaN and infinities fail every one. A test checks that every
# numeric field of every config file is listed.
NUMERIC_RANGES = {
    "ipc": _at_least(1),  # and one of IPCS, checked by name
    "iterations": _at_least(0),
    "lr_img": _POSITIVE,
    "batch_real": _at_least(1),
    "seed": _SEED,
    "num_exp": _at_least(1),
    "classes_per_chunk": _at_least(0),  # 0 = all classes at once
    "net_num": _at_least(1),
    "initial_nets": _at_least(1),
    "net_generate_interval": _at_least(1),
    "fetch_net_num": _at_least(1),
    "model_train_steps": _at_least(1),
    "trained_bs": _at_least(1),
    "lr_net": _POSITIVE,
    "net_momentum": _MOMENTUM,
    "net_weight_decay": _at_least(0),
    "train_net_num": _at_least(1),
    "ce_weight": _at_least(0),
    "eval.num_eval": _at_least(1),
    "eval.epochs": _at_least(0),  # training runs epochs + 1 passes
    "eval.every": _at_least(1),
    "eval.lr": _POSITIVE,
    "eval.momentum": _MOMENTUM,
    "eval.weight_decay": _at_least(0),
    "eval.batch_size": _at_least(1),
    "eval.test_batch_size": _at_least(1),
    "cmi.weight": _at_least(0),  # 0 = off
    "cmi.num_teachers": _at_least(1),
    "cmi.epochs": _at_least(1),
    "cmi.lr": _POSITIVE,
    "cmi.momentum": _MOMENTUM,
    "cmi.weight_decay": _at_least(0),
    "cmi.batch_size": _at_least(1),
    "dataset.validation_size": _at_least(0),  # training images per class held out; 0 = none
    "coreset.epochs": _at_least(1),
    "coreset.lr": _POSITIVE,
    "coreset.momentum": _MOMENTUM,
    "coreset.weight_decay": _at_least(0),
    "coreset.batch_size": _at_least(1),
    "num_devices": _at_least(0),  # 0 = every device
    "checkpoint_every": _at_least(1),
    "log_every": _at_least(1),
}


def lookup(config, dotted, default=None):
    """The value of dotted field `dotted` of a ConfigDict or nested dict, or `default`."""
    node = config
    for name in dotted.split("."):
        if not hasattr(node, "keys") or name not in node:
            return default
        node = node[name]
    return node


def check_numeric_ranges(config):
    """Raises UserError naming the first numeric field of `config` outside its NUMERIC_RANGES."""
    for field, (allowed, description) in NUMERIC_RANGES.items():
        value = lookup(config, field)
        if value is None:  # a config without this field (built in Python) has nothing to check
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.UserError(f"{field} must be a number {description}, got {value!r}.")
        if not (math.isfinite(value) and allowed(value)):
            raise errors.UserError(f"{field} must be {description}, got {value!r}.")


def validate(config):
    """Raises UserError naming the first invalid field of `config` and the allowed values."""
    from bacon_jax import data, models  # Local import: configs import this module cheaply.

    check_numeric_ranges(config)
    choose("method", config.method, METHODS)
    check_method_defaults(config)
    choose("dataset", config.dataset.name, tuple(data.DATASETS))
    choose("ipc", config.ipc, IPCS + tuple(config.get("extra_ipcs", ())))
    choose("image_update", config.image_update, IMAGE_UPDATES)
    for name in (config.model, *config.eval.models):
        choose("architecture", name, models.MODEL_NAMES)
    if config.method in ("idm", "bacon"):
        if config.train_net_num != 1:
            raise errors.UserError(
                f"train_net_num={config.train_net_num}: only 1 is supported (every reference "
                "command uses 1)."
            )
        if config.fetch_net_num > config.initial_nets:
            raise errors.UserError(
                f"fetch_net_num={config.fetch_net_num} exceeds initial_nets={config.initial_nets}."
            )
    return config


# How a field may differ between a run directory's config.json and the config of a rerun into it
# (`check_rerun`), one entry per field of configs/default.py (a test keeps it complete):
NEUTRAL = "neutral"  # schedule, memory, parallelism or location only: the same results
EVALUATION = "evaluation"  # final-evaluation settings: the saved set is evaluated again
GROW = "grow"  # may grow: resume and continue a run, add experiments
MATCH = "match"  # changes what is distilled: must be equal
RERUN_FIELDS = {
    "method": MATCH,
    # A record of whose settings the fields hold; the fields themselves are compared.
    "method_defaults": NEUTRAL,
    "ipc": MATCH,
    "iterations": GROW,
    "lr_img": MATCH,
    "batch_real": MATCH,
    "seed": MATCH,
    "num_exp": GROW,
    "dataset.name": MATCH,
    # Another source may order the examples differently, which changes every real-data draw.
    "dataset.source": MATCH,
    # Locations: the same files read from another place (another machine, a bucket).
    "dataset.path": NEUTRAL,
    "dataset.data_dir": NEUTRAL,
    "dataset.zca": MATCH,
    # The held-out images are taken out of everything the run learns from.
    "dataset.validation_size": MATCH,
    "model": MATCH,
    "dsa": MATCH,
    "dsa_families": MATCH,
    "expand": MATCH,
    "image_update": MATCH,
    "classes_per_chunk": NEUTRAL,
    "net_num": MATCH,
    "initial_nets": MATCH,
    "net_generate_interval": MATCH,
    "fetch_net_num": MATCH,
    "model_train_steps": MATCH,
    "trained_bs": MATCH,
    "lr_net": MATCH,
    "net_momentum": MATCH,
    "net_weight_decay": MATCH,
    "train_net_num": MATCH,
    "syn_ce": MATCH,
    "ce_weight": MATCH,
    "eval.num_eval": EVALUATION,
    "eval.epochs": EVALUATION,
    "eval.every": MATCH,  # also the period of the pool meters' reset (SPEC 5.6)
    "eval.models": EVALUATION,
    "eval.intermediate": NEUTRAL,
    "eval.lr": EVALUATION,
    "eval.momentum": EVALUATION,
    "eval.weight_decay": EVALUATION,
    "eval.batch_size": EVALUATION,
    "eval.dsa": EVALUATION,
    "eval.test_batch_size": NEUTRAL,
    "cmi.weight": MATCH,
    # The teachers (another directory may hold other teachers) and the settings they were trained
    # with.
    "cmi.teacher_dir": MATCH,
    "cmi.num_teachers": MATCH,
    "cmi.teacher_model": MATCH,
    "cmi.epochs": MATCH,
    "cmi.lr": MATCH,
    "cmi.momentum": MATCH,
    "cmi.weight_decay": MATCH,
    "cmi.batch_size": MATCH,
    # The coreset baselines' feature network (method=herding|kcenter).
    "coreset.epochs": MATCH,
    "coreset.lr": MATCH,
    "coreset.momentum": MATCH,
    "coreset.weight_decay": MATCH,
    "coreset.batch_size": MATCH,
    # Forms of the same maths per backend (backend.py): results agree to float round-off.
    "unroll_loops": NEUTRAL,
    "fused_blocks": NEUTRAL,
    "compiler_options": NEUTRAL,
    "num_devices": NEUTRAL,
    "checkpoint_every": NEUTRAL,
    "log_every": NEUTRAL,
}


def leaf_fields(tree, prefix=""):
    """The dotted names of the leaves of a ConfigDict or nested dict, in order."""
    names = []
    for name in tree.keys():
        value = tree[name]
        dotted = prefix + name
        names += leaf_fields(value, dotted + ".") if hasattr(value, "keys") else [dotted]
    return names


_ABSENT = object()  # a field missing from config.json


def rerun_differences(saved, config):
    """The fields that keep `config` from continuing the run whose config.json is `saved`.

    Args:
        saved: the run's config as read from its config.json.
        config: the ConfigDict of the rerun.

    Returns:
        [(field, saved value, new value)] of the fields that differ where RERUN_FIELDS does not
        allow it: MATCH fields (and fields it does not list) that differ, GROW fields that shrink.
        Fields absent from `saved` (added to the code after the run started) are not compared.
    """
    current = json.loads(json.dumps(to_dict(config)))  # tuples as lists, as config.json reads back
    found = []
    for field in leaf_fields(current):
        kind = RERUN_FIELDS.get(field, MATCH)
        old, new = lookup(saved, field, _ABSENT), lookup(current, field)
        if old is _ABSENT or old == new or kind in (NEUTRAL, EVALUATION):
            continue
        if kind == GROW and new > old:
            continue
        found.append((field, old, new))
    return found



def check_rerun(saved, config, workdir):
    """Raises UserError naming every field that keeps `config` from continuing the run in `workdir`.

    Args:
        saved: the run's config as read from `workdir`/config.json.
        config: the ConfigDict of the rerun.
        workdir: the run directory, for the message.
    """
    differences = rerun_differences(saved, config)
    if not differences:
        return
    details = "; ".join(
        f"{field}: run {old!r}, this config {new!r}"
        + (" (may only grow)" if RERUN_FIELDS.get(field) == GROW else "")
        for field, old, new in differences)
    raise errors.UserError(
        f"{workdir} holds a run with other settings ({details}). Use a new --workdir for these "
        f"settings, or the run's values to resume it (a rerun may change the final-evaluation "
        f"settings eval.* except eval.every, and grow iterations and num_exp).")


def to_dict(config):
    """A plain, JSON-serialisable dict of a ConfigDict."""
    return ml_collections.ConfigDict(config).to_dict()


def _load_module(path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_file(config_file):
    return os.path.join(os.path.dirname(os.path.abspath(config_file)), "default.py")


def load_base_config(config_file):
    """Loads `get_base_config()` from the `default.py` that sits beside `config_file`.

    Config files are loaded by path (`--config=configs/mnist.py:ipc10`), so they cannot import their
    siblings as modules; this reads `configs/default.py` the same way.
    """
    return _load_module(_default_file(config_file), "bacon_jax_default_config").get_base_config()


def load_config_file(path, arg=None):
    """Loads a config file by path and calls its `get_config(arg)`, as `--config=path:arg` does.

    For scripts and tests that build configs without absl flags.
    """
    name = "bacon_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    return _load_module(path, name).get_config(arg)


def _config_files(directory):
    return sorted(glob.glob(os.path.join(directory, "*.py")))


def _field_comments(default_file):
    """{field: the comment on its line} of `config.<field> = ...  # comment` lines."""
    with open(default_file) as f:
        found = (re.match(r"\s*config\.([\w.]+) = .*?  # (.*)$", line) for line in f)
        return {match.group(1): match.group(2) for match in found if match}


def describe_configs(config_dir):
    """What `--help` lists: config files and presets, datasets, methods, architectures, fields.

    Generated from the config files in `config_dir`, `data.DATASETS`, METHODS, `models.MODEL_NAMES`
    and the fields of `config_dir`/default.py (with the comment on each field's line), so it lists
    what the code accepts.
    """
    from bacon_jax import data, models  # Local import: configs import this module cheaply.

    lines = ["", "Config files (--config=<file>:<preset>[,field=value,...]):"]
    for path in _config_files(config_dir):
        module = _load_module(path, "bacon_jax_help_" + os.path.basename(path)[:-3])
        presets = ", ".join(getattr(module, "PRESETS", {})) or "none"
        lines.append(f"  {os.path.relpath(path)}: presets {presets}")
    lines += [
        f"Datasets (dataset.name): {', '.join(data.DATASETS)}",
        f"Methods (method=): {', '.join(METHODS)}",
        f"Architectures (model=, eval.models=): {', '.join(models.MODEL_NAMES)}",
        "Fields with their defaults in configs/default.py (set them in the config argument, "
        ":ipc10,field=value, or with --config.field=value):",
    ]
    default_file = os.path.join(config_dir, "default.py")
    base = _load_module(default_file, "bacon_jax_help_default").get_base_config()
    comments = _field_comments(default_file)
    for field in leaf_fields(base):
        comment = f"  # {comments[field]}" if field in comments else ""
        lines.append(f"  {field} = {lookup(base, field)!r}{comment}")
    return "\n".join(lines) + "\n"


def _missing_config_file(path, script):
    """The UserError for a --config file that does not exist, listing the ones that do."""
    beside_scripts = os.path.join(os.path.dirname(os.path.abspath(script)), os.pardir, "configs")
    for directory in (os.path.dirname(path) or os.curdir, beside_scripts):
        if _config_files(directory):
            available = ", ".join(os.path.relpath(p) for p in _config_files(directory))
            return errors.UserError(f"Config file {path!r} does not exist; available: {available}.")
    return errors.UserError(f"Config file {path!r} does not exist (relative to {os.getcwd()}).")


def check_config_flags(argv, flag="config"):
    """Raises a UserError for a bad `--config` file, preset or `--config.<field>` flag.

    ml_collections reports a missing file, a bad preset or a flag that names no field with a
    traceback; this check loads the `--config=path:arg` file of `argv` itself and names the
    problem: the config files that exist, the bad preset or value, or the unknown field and the
    fields next to it. It reads the override forms ml_collections accepts (`-`/`--`, `no` prefix,
    `=value` or a separate value) and expands `--flagfile`s first. Anything it cannot judge (no
    --config, a config file that fails with its own bug) is left to the flag parser. A
    `--config.method` that differs from the config argument's method is refused here too
    (`check_method_defaults`), before anything runs.
    """
    from absl import flags

    script = argv[0]
    try:
        argv = flags.FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False)
    except flags.Error:  # the flag parser reports it
        return
    file_flag = re.compile(rf"^--?{flag}(?:=(.*))?$")
    override = re.compile(rf"^--?(?:no)?{flag}\.([^=]+)(?:=(.*))?$")
    config = None
    for index, item in enumerate(argv):
        match = file_flag.match(item)
        if match:
            config = match.group(1) if match.group(1) is not None else (argv[index + 1:] or [None])[0]
    if config is None:
        return
    path, _, arg = config.partition(":")
    if not os.path.isfile(path):
        raise _missing_config_file(path, script)
    try:
        config = load_config_file(path, arg or None)
    except errors.UserError:  # a bad preset or override
        raise
    except Exception:  # a bug in the file: the flag parser reports it, with its traceback
        return
    overridden = {}
    for index, item in enumerate(argv):
        match = override.match(item)
        if match:
            _field_parent(config, match.group(1))
            value = match.group(2)
            if value is None and index + 1 < len(argv) and not argv[index + 1].startswith("-"):
                value = argv[index + 1]
            overridden[match.group(1)] = value
    if overridden.get("method") is not None:
        config.method = choose("method", overridden["method"], METHODS)
        if "method_defaults" in overridden:
            config.method_defaults = overridden["method_defaults"] or ""
        check_method_defaults(config)


def parse_flags(argv):
    """absl `flags_parser` for scripts with a `--config` file flag: `app.run(main, parse_flags)`.

    Names an unknown `--config.<field>` and the allowed fields, then parses as absl does, then
    `validate`s the resulting config: a bad value stops the script with one line, no traceback,
    before anything runs or is written. With `--help` (or `--helpfull`), the script's usage text
    also lists the config files, presets, datasets, methods, architectures and fields
    (`describe_configs` of the `configs/` directory beside the script's directory).
    """
    from absl import app, flags

    if any(item.lstrip("-") in ("help", "helpshort", "helpfull", "?") for item in argv[1:]):
        main = sys.modules["__main__"]
        config_dir = os.path.join(os.path.dirname(os.path.abspath(argv[0])), os.pardir, "configs")
        if os.path.isdir(config_dir):
            main.__doc__ = (main.__doc__ or "") + describe_configs(config_dir)

    def fail(error):
        sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
        sys.exit(1)

    try:
        check_config_flags(argv)
    except ValueError as error:
        fail(error)
    remaining = app.parse_flags_with_usage(argv)
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None:
        try:
            validate(config)
        except ValueError as error:
            fail(error)
    return remaining

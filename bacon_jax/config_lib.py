"""Helpers for the ml-collections config files in `configs/`.

A config file is loaded as `configs/<dataset>.py:<arg>`, where `arg` is a preset name optionally
followed by comma-separated overrides, e.g. `ipc10` or `ipc10,method=idm,iterations=200`
(big_vision's `parse_arg` idea). Dotted keys reach nested fields: `ipc1,eval.num_eval=1`.
"""

import ml_collections

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
            raise ValueError(f"Config arg {arg!r} names two presets: {preset!r} and {token!r}.")
        else:
            preset = token
    return preset, overrides


def _convert(text, current, key):
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"Override {key}={text!r}: expected a boolean (true/false).")
        return lowered in ("true", "1")
    if isinstance(current, (int, float)):
        kind = type(current)
        try:
            return kind(text)
        except ValueError:
            raise ValueError(
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
    """(the ConfigDict holding dotted `key`, its last name); a ValueError lists the fields there."""
    *parents, leaf = key.split(".")
    node = config
    for depth, name in enumerate(parents + [leaf]):
        where = ".".join(parents[:depth])
        if not isinstance(node, ml_collections.ConfigDict):
            raise ValueError(f"Unknown config field {key!r}: {where!r} is a value, not a group.")
        if name not in node:
            raise ValueError(f"Unknown config field {key!r}; fields at {where or 'the top level'}: "
                             f"{sorted(node.keys())}.")
        if depth < len(parents):
            node = node[name]
    return node, leaf


def choose(name, value, allowed):
    """Returns `value` if it is in `allowed`, else raises a ValueError listing the allowed values."""
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; allowed: {', '.join(map(str, allowed))}.")
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
            raise ValueError(f"Preset {preset!r} given, but this config file has no presets; use a "
                             "dataset's file, e.g. configs/mnist.py:ipc10.")
        _set_fields(base, presets[choose("preset", preset, tuple(presets))])
    method = choose("method", overrides.get("method", base.method), METHODS)
    _set_fields(base, METHOD_DEFAULTS[method])
    _set_fields(base, (method_presets or {}).get((preset, method), {}))
    base.method_defaults = method
    if cmi_switch == "on":
        if method in SELECTION_METHODS:
            raise ValueError(f"cmi=on needs a distillation method (dm, idm, bacon), not {method}.")
        base.cmi.weight = cmi_weight(cmi_weights, preset, method)
    apply_overrides(base, overrides)
    return base


def check_method_defaults(config):
    """Raises ValueError when `config.method` was changed after the method's settings were applied.

    `build` applies the method's reference settings (METHOD_DEFAULTS, the config file's per-method
    values) for the `method=` of the config argument and records it in `config.method_defaults`.
    Setting `config.method` later (`--config.method=dm`, or in Python) would keep the first
    method's settings: DM with BACON's expansion, per-class update and image learning rate.
    """
    recorded = config.get("method_defaults")
    if recorded and recorded != config.method:
        raise ValueError(
            f"config.method is {config.method!r} but the config holds the settings of "
            f"{recorded!r} (config.method_defaults). Choose the method in the config argument: "
            f"--config=configs/<dataset>.py:<preset>,method={config.method}, or in Python "
            f"load_config_file(path, '<preset>,method={config.method}'). To keep the settings of "
            f"{recorded} under method {config.method} on purpose, also set method_defaults='' "
            f"(no record)."
        )


def validate(config):
    """Raises ValueError naming the first invalid field of `config` and the allowed values."""
    from bacon_jax import data, models  # Local import: configs import this module cheaply.

    choose("method", config.method, METHODS)
    check_method_defaults(config)
    choose("dataset", config.dataset.name, tuple(data.DATASETS))
    choose("ipc", config.ipc, IPCS + tuple(config.get("extra_ipcs", ())))
    choose("image_update", config.image_update, IMAGE_UPDATES)
    for name in (config.model, *config.eval.models):
        choose("architecture", name, models.MODEL_NAMES)
    if config.iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {config.iterations}.")
    if config.eval.every <= 0:
        raise ValueError(f"eval.every must be positive, got {config.eval.every}.")
    if config.eval.num_eval < 1:
        raise ValueError(f"eval.num_eval must be >= 1 (fresh networks per evaluation), got "
                         f"{config.eval.num_eval}.")
    if config.num_exp < 1:
        raise ValueError(f"num_exp must be >= 1, got {config.num_exp}.")
    if config.dataset.get("validation_size", 0) < 0:
        raise ValueError(f"dataset.validation_size must be >= 0 (images per class held out), got "
                         f"{config.dataset.validation_size}.")
    if "coreset" in config and config.coreset.epochs < 1:
        raise ValueError(f"coreset.epochs must be >= 1, got {config.coreset.epochs}.")
    if config.method in ("idm", "bacon"):
        if config.train_net_num != 1:
            raise ValueError(
                f"train_net_num={config.train_net_num}: only 1 is supported (every reference "
                "command uses 1)."
            )
        if config.fetch_net_num > config.initial_nets:
            raise ValueError(
                f"fetch_net_num={config.fetch_net_num} exceeds initial_nets={config.initial_nets}."
            )
    return config


def to_dict(config):
    """A plain, JSON-serialisable dict of a ConfigDict."""
    return ml_collections.ConfigDict(config).to_dict()


def load_base_config(config_file):
    """Loads `get_base_config()` from the `default.py` that sits beside `config_file`.

    Config files are loaded by path (`--config=configs/mnist.py:ipc10`), so they cannot import their
    siblings as modules; this reads `configs/default.py` the same way.
    """
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), "default.py")
    spec = importlib.util.spec_from_file_location("bacon_jax_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_base_config()


def load_config_file(path, arg=None):
    """Loads a config file by path and calls its `get_config(arg)`, as `--config=path:arg` does.

    For scripts and tests that build configs without absl flags.
    """
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "bacon_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def check_config_flags(argv, flag="config"):
    """Raises a ValueError for a `--config.<field>` flag that names no field of the config.

    ml_collections reports such a flag with a bare AttributeError traceback; this check loads the
    `--config=path:arg` file of `argv` and names the unknown field and the fields next to it. It
    reads the override forms ml_collections accepts (`-`/`--`, `no` prefix, `=value` or a separate
    value) and expands `--flagfile`s first. Anything it cannot judge (no or unloadable --config)
    is left to the flag parser. A `--config.method` that differs from the config argument's method
    is refused here too (`check_method_defaults`), before anything runs.
    """
    import re

    from absl import flags

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
    try:
        config = load_config_file(path, arg or None)
    except Exception:  # the flag parser reports the file's own error
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
    before anything runs or is written.
    """
    import sys

    from absl import app, flags

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

"""Base config shared by every dataset file: the reference settings common to all commands.

Values follow SPEC 9.1 (every BACON/IDM command line). Dataset files import `get_base_config()` and
set their presets. Field names marked "contract" are relied on by tests, docs and users.
"""

import ml_collections


def get_base_config():
    """Returns the base ConfigDict (BACON, ConvNet, DSA, quadrant init, reference evaluation)."""
    config = ml_collections.ConfigDict()
    config.method = "bacon"  # contract: random | dm | idm | bacon | herding | kcenter
    # The method whose reference settings the other fields hold (config_lib.build sets it with the
    # `method=` of the config argument). A config whose `method` differs is refused, e.g. after
    # `--config.method=dm` or `config.method = "dm"`, which would run DM with BACON's settings;
    # '' = no record (a deliberate mix).
    config.method_defaults = "bacon"
    config.ipc = 10  # contract: images per class
    config.iterations = 20000  # contract: distillation passes; the reported set is after this many
    config.lr_img = 0.2  # contract: image learning rate (DM uses 1.0, config_lib.METHOD_DEFAULTS)
    config.batch_real = 256  # contract: real images per class per iteration (min with class size)
    config.seed = 0  # contract: root of every PRNG key (SPEC A3)
    config.num_exp = 5  # contract: independent distillations

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "digits"  # contract
    config.dataset.source = "digits"  # digits | npz | tfds
    config.dataset.path = ""  # the .npz file when source == 'npz'
    config.dataset.data_dir = ""  # TFDS data_dir when source == 'tfds'
    config.dataset.zca = False  # SPEC 1.2
    # Training images per class held out as a validation split (stratified, fixed by the seed);
    # 0 = none. When > 0, distillation and coresets never see them, every evaluation also scores
    # the networks on them, and the snapshot with the best validation accuracy is reported beside
    # the final one (the reference picks its "best" set by test accuracy, SPEC quirk 12).
    config.dataset.validation_size = 0

    # Distillation network and augmentation.
    config.model = "ConvNet"
    config.dsa = True
    config.dsa_families = ("color", "crop", "cutout", "flip", "scale", "rotate")
    config.expand = True  # partition-and-expansion (IDM's --aug, SPEC 4); DM/random: False
    # per_class: the reference's one image step per class with one momentum buffer, vectorised
    # exactly (SPEC 5.7, A2). joint: one step on the summed loss (DM, SPEC 6).
    config.image_update = "per_class"
    config.classes_per_chunk = 0  # classes batched per pass; 0 = all (memory knob, same results)

    # Model pool and synthetic cross-entropy (IDM/BACON, SPEC 5.1-5.8).
    config.net_num = 100
    config.initial_nets = 3
    config.net_generate_interval = 30
    config.fetch_net_num = 2
    config.model_train_steps = 10
    config.trained_bs = 256
    config.lr_net = 0.01
    config.net_momentum = 0.9
    config.net_weight_decay = 5e-4
    config.train_net_num = 1
    config.syn_ce = True
    config.ce_weight = 0.5

    config.eval = ml_collections.ConfigDict()
    config.eval.num_eval = 5  # contract: fresh networks per evaluation
    # contract: the reference's epoch_eval_train; training runs epochs + 1 passes with the learning
    # rate divided by 10 after epoch epochs // 2 + 1 (SPEC 8).
    config.eval.epochs = 1000
    # contract: iterations between evaluations; the final iteration is always evaluated. Also the
    # period of the pool meters' reset, which shapes the optimisation (SPEC 5.6, quirk 2).
    config.eval.every = 100
    config.eval.models = ("ConvNet",)  # contract: architectures evaluated
    # False skips the intermediate evaluations (the meter resets still happen on schedule).
    config.eval.intermediate = True
    config.eval.lr = 0.01
    config.eval.momentum = 0.9
    config.eval.weight_decay = 5e-4
    config.eval.batch_size = 256
    config.eval.dsa = True
    config.eval.test_batch_size = 2048

    # CMI regularizer (SPEC 7, A8) and its teachers (SPEC 7.1, trained by experiments/pretrain.py).
    config.cmi = ml_collections.ConfigDict()
    config.cmi.weight = 0.0  # lambda; 0 = off. Reference DM lambda 8000 (SPEC 7.3)
    config.cmi.teacher_dir = ""  # the --workdir of experiments/pretrain.py
    config.cmi.num_teachers = 1  # teachers trained; one is drawn per iteration (the reference: 1000)
    config.cmi.teacher_model = "ResNet18"  # instance-norm ResNet18, embed = 512-d (SPEC 7.1)
    config.cmi.epochs = 40
    config.cmi.lr = 0.01  # constant, no schedule
    config.cmi.momentum = 0.9
    config.cmi.weight_decay = 1e-3  # torch-coupled, on every parameter
    config.cmi.batch_size = 256

    # Coreset baselines (method=herding|kcenter, coreset.py): the feature network, of architecture
    # eval.models[0], trained on the real training set (minus any validation split) with the CMI
    # teachers' recipe (SPEC 7.1, teacher.train_teacher: SGD at a constant learning rate, no
    # augmentation). The DC/DM papers' coreset rows select in a trained network's embedding
    # without fixing its budget in the text we read; this one is ours.
    config.coreset = ml_collections.ConfigDict()
    config.coreset.epochs = 40
    config.coreset.lr = 0.01
    config.coreset.momentum = 0.9
    config.coreset.weight_decay = 1e-3
    config.coreset.batch_size = 256

    # Per-backend forms of the same maths (bacon_jax/backend.py); 'auto' picks per backend.
    # 'auto': unroll short inner loops on CPU only (XLA:CPU is slow on convs inside loops); bool.
    config.unroll_loops = "auto"
    # 'auto': ConvNet instance-norm blocks with hand-written gradients (fused.py) on CPU; bool.
    config.fused_blocks = "auto"
    # 'auto': XLA:CPU compile options of backend.CPU_COMPILER_OPTIONS on CPU; 'none'; or
    # 'option=value;option=value'.
    config.compiler_options = "auto"
    # Devices to map the steps over (0 = every device of every process). Results do not depend
    # on it (SPEC A3); checkpoints resume on any count.
    config.num_devices = 0
    config.checkpoint_every = 500
    config.log_every = 10
    return config


def get_config(arg=None):
    """The base config with no dataset-specific preset (digits data)."""
    from bacon_jax import config_lib

    return config_lib.build(get_base_config(), {}, arg)

"""One source of defaults: the config dataclasses. The flags derive from them; the recipes parse to the same configs.

tests/data/recipe_configs.json holds every recipe's (ModelConfig, TrainConfig) as train.py parsed it before the
flags were derived from the dataclasses (hand-written flags, commit d7f0cea; the Fashion-MNIST recipe as that
code parsed its new version, branch fashion; a recipe written later, as parsed when it was added; a value changed
on purpose, as changed: celeba32_cpu's precision float32 -> auto, REPORT.md 6.10, and its loss weighting
none -> min_snr, REPORT.md 6.11, and celeba64_cpu's the same way; celeba32_cpu's train_steps 8000 -> 10500
with cooldown_steps 2000, REPORT.md 6.13). A recipe must still give
exactly those values; fields added since must hold what the old code used implicitly.
"""

import dataclasses
import inspect
import json
import pathlib

import pytest
from absl import flags

from keras_ddpm import cli
from keras_ddpm.config import ModelConfig, TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = json.loads((REPO / "tests" / "data" / "recipe_configs.json").read_text())
# Fields added to ModelConfig after the snapshot, with the values the old code used without saying so:
# NoiseSchedule's beta_1 and beta_T (Ho et al. 2020), DiffusionModel's min-SNR gamma (Hang et al. 2023) and its
# uniform timesteps.
ADDED_FIELDS = {"beta_start": 1e-4, "beta_end": 0.02, "min_snr_gamma": 5.0, "timestep_sampling": "uniform"}
# Defaults of the library's constructors that differ from ModelConfig's on purpose: `build_unet` is also called
# for small images (28x28 never reaches a 16x16 level, so attention at 16 would be an error there) and by
# tests that want no dropout; the project's models come from ModelConfig, which sets all three.
CONSTRUCTOR_EXCEPTIONS = {"width", "attention_resolutions", "dropout"}


def recipe_paths():
    return ["celeba.flags", *sorted(str(path.relative_to(REPO)) for path in (REPO / "flags").glob("*.flags"))]


def as_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def test_the_snapshot_covers_every_recipe():
    assert sorted(RECIPES) == recipe_paths()


@pytest.mark.parametrize("recipe", recipe_paths())
def test_each_recipe_parses_to_the_configs_it_gave_before(recipe):
    model_config, train_config = cli.configs_from_flagfile(REPO / recipe)
    model, train = as_json(model_config), as_json(train_config)

    assert {key: model[key] for key in RECIPES[recipe]["model"]} == RECIPES[recipe]["model"]
    assert {key: model[key] for key in ADDED_FIELDS} == ADDED_FIELDS
    assert set(model) == set(RECIPES[recipe]["model"]) | set(ADDED_FIELDS)
    assert train == RECIPES[recipe]["train"]


@pytest.mark.parametrize("recipe", recipe_paths())
def test_each_value_a_recipe_sets_reaches_the_configs(recipe):
    model_config, train_config = cli.configs_from_flagfile(REPO / recipe)
    fields = {cli.flag_name(field): field for config in (ModelConfig, TrainConfig) for field in dataclasses.fields(config)}
    values = {**as_json(model_config), **as_json(train_config)}
    flag_values = flags.FlagValues()
    cli.define_train_flags(flag_values)
    flag_values(["train.py", f"--flagfile={REPO / recipe}"])
    for line in (REPO / recipe).read_text().splitlines():
        if not line.startswith("--"):
            continue
        name = line[2:].split("=")[0]
        if name in fields:
            expected = cli.field_value(fields[name], flag_values)
            assert values[fields[name].name] == json.loads(json.dumps(expected)), (recipe, line)


def test_every_field_has_a_flag_with_help_or_says_it_has_none():
    for config in (ModelConfig, TrainConfig):
        for field in dataclasses.fields(config):
            assert field.metadata["help"], field.name
            assert cli.flag_name(field) or field.metadata["flag"] == "", field.name


def test_the_flags_default_to_the_dataclass_defaults():
    flag_values = flags.FlagValues()
    cli.define_train_flags(flag_values)
    flag_values(["train.py"])
    for config in (ModelConfig, TrainConfig):
        for field in dataclasses.fields(config):
            name = cli.flag_name(field)
            if not name:
                continue
            expected = cli.DATASET_DEPENDENT_DEFAULTS.get(field.name, field.default)
            value = flag_values[name].value
            value = None if value is None else cli.field_value(field, flag_values)
            assert value == expected, field.name
            assert flag_values[name].help.endswith(field.metadata["help"])  # enum flags prefix their choices


def test_the_flags_offer_the_choices_the_library_takes():
    # config.py imports no model code, so it lists the choices again; this keeps the two lists equal.
    from typing import get_args

    from keras_ddpm import config, model, samplers, schedule
    from keras_ddpm.data import celeba, common

    assert config.DATASETS == get_args(common.DatasetName)
    assert config.CROPS == get_args(celeba.CropName) == tuple(celeba.CROP_BOXES)
    assert config.OBJECTIVES == get_args(schedule.Objective)
    assert config.LOSS_WEIGHTINGS == get_args(model.LossWeighting)
    assert config.TIMESTEP_SAMPLINGS == get_args(model.TimestepSampling)
    assert config.SAMPLERS == samplers.SAMPLERS
    assert config.SPACINGS == samplers.SPACINGS
    assert config.SCHEDULES == get_args(schedule.ScheduleKind)


def test_the_library_constructors_default_to_the_model_config():
    from keras_ddpm.model import DiffusionModel
    from keras_ddpm.schedule import NoiseSchedule
    from keras_ddpm.unet import build_unet

    defaults = ModelConfig()
    schedule_names = {"schedule": "kind"}
    checked = set()
    for function in (build_unet, DiffusionModel.__init__, NoiseSchedule.__init__):
        parameters = inspect.signature(function).parameters
        for field in dataclasses.fields(ModelConfig):
            parameter = parameters.get(schedule_names.get(field.name, field.name))
            if parameter is None or parameter.default is inspect.Parameter.empty:
                continue
            checked.add(field.name)
            if field.name not in CONSTRUCTOR_EXCEPTIONS:
                assert parameter.default == getattr(defaults, field.name), (function.__qualname__, field.name)
    assert {"ema_decay", "min_snr_gamma", "beta_start", "beta_end", "norm_groups", "label_dropout"} <= checked


def test_quiet_logs_silences_absl_info_unless_verbosity_was_asked_for(monkeypatch):
    from absl import flags
    from absl import logging as absl_logging

    before = absl_logging.get_verbosity()
    monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 0)
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        cli.quiet_logs()
        assert absl_logging.get_verbosity() == absl_logging.WARNING
        monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 1)  # as after --verbosity=1
        absl_logging.set_verbosity(absl_logging.DEBUG)
        cli.quiet_logs()
        assert absl_logging.get_verbosity() == absl_logging.DEBUG
    finally:
        absl_logging.set_verbosity(before)

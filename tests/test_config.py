from pathlib import Path

import dataclasses
import re
import subprocess
import sys

import pytest

from alexnet_tasks.config import SECTIONS, PipelineConfig, seed_for_date, config_for_run
from alexnet_tasks.layout import Layout, artifacts_root, run_folder_name

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_valid_and_official():
    config = PipelineConfig.from_dict({})
    assert config.source_md5 == "c58f30108f718f92721af3b95e74349a"
    assert config.source_url.endswith("cifar-10-python.tar.gz")
    assert config.image_size == 227 and config.validation_size == 5000


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown setting.*'epoch'"):
        PipelineConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"image_size": 66}, "image_size must be between 67"),
        ({"epochs": 0}, "epochs must be between 1"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"learning_rate": 0}, r"learning_rate must be in \(0, 10\]"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"source_md5": "ABC"}, "source_md5 must be 32 lowercase hex"),
        ({"recipe": "turbo"}, "recipe must be one of"),
        ({"validation_size": 5}, "validation_size must be between 10"),
        ({"train_limit": 3}, "train_limit must be between 10"),
        ({"source_url": " "}, "source_url must be a non-empty"),
        ({"split_seed": -1}, "split_seed must be between 0"),
        ({"split_seed": 1.5}, "split_seed must be an integer"),
    ],
)
def test_bad_values_name_the_setting(values, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict(values)


def test_split_settings_checked_against_the_archive():
    PipelineConfig(validation_size=100, train_limit=50).check_against_source(200)
    with pytest.raises(ValueError, match="validation_size=200 leaves no training images.*200"):
        PipelineConfig(validation_size=200).check_against_source(200)
    with pytest.raises(ValueError, match="train_limit=150 exceeds the 100 training images"):
        PipelineConfig(validation_size=100, train_limit=150).check_against_source(200)


def test_data_folders_are_keyed_by_source_and_shaping_settings(tmp_path):
    layout = Layout(tmp_path)
    a = PipelineConfig(source_md5="a" * 32, validation_size=100, split_seed=1)
    b = PipelineConfig(source_md5="a" * 32, validation_size=100, split_seed=2)
    c = PipelineConfig(source_md5="a" * 32, validation_size=100, split_seed=1, epochs=3, image_size=99, seed=7)
    assert layout.shards(a) != layout.shards(b) and layout.split(a) != layout.split(b)
    # Training settings, the training seed among them, do not reshape the data.
    assert layout.shards(a) == layout.shards(c) and layout.split(a) == layout.split(c)
    assert layout.shards(a).parent == tmp_path / "data" / ("a" * 32)


def test_the_default_split_keeps_the_data_folder_of_the_former_single_seed():
    # Before the training seed had a setting of its own, `seed` (default 42) drew the split and keyed
    # its folder; the split seed's default draws the same split under the same name, so shards built
    # then are reused.
    assert PipelineConfig(validation_size=5000).shards_key() == "val5000-seed42-limitall-prep1"


def test_seed_for_date_is_a_deterministic_seed_within_bounds():
    import pendulum
    from datetime import datetime, timedelta, timezone

    night = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)
    seeds = [seed_for_date(night + timedelta(days=day)) for day in range(60)]
    assert len(set(seeds)) == 60  # a new training seed every night
    high = FIELDS["seed"].metadata["schema"]["maximum"]
    assert all(isinstance(seed, int) and 0 <= seed <= high for seed in seeds)
    # The same instant gives the same seed, however it is written.
    assert seed_for_date(night) == seeds[0]
    assert seed_for_date(pendulum.datetime(2026, 11, 29, 3, 0, tz="Europe/Paris")) == seeds[0]
    assert seed_for_date(night + timedelta(hours=1)) != seeds[0]
    with pytest.raises(ValueError, match="timezone"):
        seed_for_date(datetime(2026, 11, 29, 2, 0))


def test_scheduled_runs_train_with_the_dates_seed_manual_runs_with_the_forms():
    from datetime import datetime, timezone

    night = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)
    form = PipelineConfig(seed=5, split_seed=9, image_size=67)
    scheduled = config_for_run(form, "scheduled", night)
    assert scheduled.seed == seed_for_date(night)
    assert scheduled == PipelineConfig(seed=seed_for_date(night), split_seed=9, image_size=67)  # nothing else moves
    assert config_for_run(form, "backfill", night).seed == seed_for_date(night)  # a backfill replays its night
    for run_type in ("manual", "asset_triggered", "operator_triggered"):
        assert config_for_run(form, run_type, night) == form
        assert config_for_run(form, run_type, None) == form
    with pytest.raises(ValueError, match="scheduled run without a logical date"):
        config_for_run(form, "scheduled", None)


def test_run_ids_become_safe_folder_names(tmp_path):
    name = run_folder_name("manual__2026-11-28T13:32:49+00:00")
    assert re.fullmatch(r"manual__2026-11-28T13_32_49_00_00-[0-9a-f]{8}", name), name
    assert Layout(tmp_path).run("a/../b").parent == tmp_path / "runs"
    with pytest.raises(ValueError):
        run_folder_name("..")


def test_two_run_ids_never_share_a_folder(tmp_path):
    layout = Layout(tmp_path)
    assert layout.run("a:b") != layout.run("a_b")
    assert layout.run("a+b") != layout.run("a:b")
    # Deterministic: the steps of one run find each other's outputs through it.
    assert layout.run("a:b") == Layout(tmp_path).run("a:b")
    # A raw id that looks like another id's folder name still gets a folder of its own.
    assert layout.run(run_folder_name("a:b")) != layout.run("a:b")
    # Long ids stay usable as one folder name.
    long_one, long_two = "x" * 400 + "1", "x" * 400 + "2"
    assert len(run_folder_name(long_one)) <= 120 and run_folder_name(long_one) != run_folder_name(long_two)


def test_config_digest_follows_the_resolved_hyperparameters():
    a = PipelineConfig(image_size=67, epochs=1)
    assert a.config_digest() == PipelineConfig.from_dict({"epochs": 1, "image_size": 67}).config_digest()
    assert a.config_digest() != PipelineConfig(image_size=67, epochs=2).config_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", a.config_digest())


def test_gate_settings_change_neither_the_run_folder_key_nor_the_training():
    from alexnet_tasks.config import GATE_PARAMS
    from alexnet_tasks.training.recipe import resolve_hyperparameters

    a = PipelineConfig(image_size=67, epochs=1)
    gated = PipelineConfig(image_size=67, epochs=1, accuracy_floor=0.6, gate_tolerance=0.02, publish_mode="approval",
                           approval_timeout=0.5)
    assert set(GATE_PARAMS) == {"accuracy_floor", "gate_tolerance", "publish_mode", "approval_timeout"}
    # A step tested alone finds the same run folder whatever the gate's settings...
    assert gated.config_digest() == a.config_digest()
    # ...and the fingerprint hashes the resolved training settings, which do not hold them: no retraining.
    assert resolve_hyperparameters(gated) == resolve_hyperparameters(a)
    assert gated.to_dict() != a.to_dict()  # the index line still records them


@pytest.mark.parametrize(
    "values, message",
    [({"accuracy_floor": 1.5}, "accuracy_floor must be between 0 and 1"),
     ({"accuracy_floor": float("nan")}, "accuracy_floor must be between 0 and 1"),
     ({"gate_tolerance": -0.1}, "gate_tolerance must be between 0 and 1"),
     ({"publish_mode": "sometimes"}, "publish_mode must be one of")],
)
def test_bad_gate_settings_name_the_setting(values, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict(values)


FIELDS = {field.name: field for field in dataclasses.fields(PipelineConfig)}


def test_every_setting_carries_its_form_facts():
    for name, field in FIELDS.items():
        facts = field.metadata
        assert facts.get("title") and facts.get("description"), name
        assert facts.get("type") in ("string", "integer", "number", "object"), name
        assert facts.get("section") in SECTIONS, name
    assert FIELDS["image_size"].metadata["schema"]["minimum"] == 67
    assert FIELDS["learning_rate"].metadata["schema"] == {"exclusiveMinimum": 0, "maximum": 10}


def test_descriptions_quoting_recipe_defaults_agree_with_the_recipes():
    from alexnet_tasks.recipes import RECIPE_DEFAULTS

    quoted = 0
    for name, field in FIELDS.items():
        for recipe, value in re.findall(r"\b(reference|fast) ([0-9][0-9.]*)\b", field.metadata["description"]):
            assert float(value) == RECIPE_DEFAULTS[recipe][name], (name, recipe, value)
            quoted += 1
    assert quoted == 6  # epochs, batch_size and learning_rate, for both recipes


def test_the_recipe_description_is_built_from_the_recipes_data():
    from alexnet_tasks.recipes import RECIPE_DEFAULTS, describe, figure

    description = FIELDS["recipe"].metadata["description"]
    for recipe, defaults in RECIPE_DEFAULTS.items():
        for value in defaults.values():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert re.search(rf"{re.escape(figure(value))}\b", description), (recipe, value)
        assert describe(defaults) in description, recipe
    # describe words whatever it is given, so another figure in the data is another figure in the form.
    assert describe({"dropout": 0.7, "warmup_epochs": 2.0, "nesterov": False}) == \
        "dropout 0.7, 2 warm-up epochs, no Nesterov"


def test_config_source_states_no_recipe_figure():
    # The form's descriptions take the recipes' figures from alexnet_tasks/recipes.py, never from prose.
    source = (ROOT / "alexnet_tasks" / "config.py").read_text()
    assert re.findall(r"\b(?:reference|fast)\W{0,2}[0-9]", source) == []


def test_validation_uses_the_form_bounds():
    for name, field in FIELDS.items():
        schema = field.metadata["schema"]
        for key, outside in (("minimum", -1), ("maximum", +1)):
            if key in schema:
                PipelineConfig.from_dict({name: schema[key]})
                with pytest.raises(ValueError, match=name):
                    PipelineConfig.from_dict({name: schema[key] + outside})
        if "exclusiveMinimum" in schema:
            with pytest.raises(ValueError, match=name):
                PipelineConfig.from_dict({name: schema["exclusiveMinimum"]})
        if "enum" in schema:
            for value in schema["enum"]:
                PipelineConfig.from_dict({name: value})


def test_readme_params_table_is_the_generated_one():
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "params_table.py")],
        capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT)},
    ).stdout
    assert re.findall(r"^#### (.+)$", table, re.M) == list(SECTIONS)  # one table per section of the form
    rows = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert sorted(rows) == sorted(FIELDS)  # every param once
    for section in re.split(r"^#### ", table, flags=re.M)[1:]:
        heading, _, rows_of_section = section.partition("\n")
        assert {name for name in re.findall(r"^\| `(\w+)` \|", rows_of_section, re.M)} == \
            {name for name, field in FIELDS.items() if field.metadata["section"] == heading}, heading
    page = (ROOT / "docs" / "params.md").read_text()
    assert table in page, "docs/params.md's params table differs from: scripts/params_table.py"


def test_artifacts_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(tmp_path / "x"))
    assert artifacts_root() == tmp_path / "x"
    monkeypatch.delenv("ALEXNET_ARTIFACTS")
    assert artifacts_root() == Path("~/alexnet-artifacts").expanduser().resolve()


def test_recipe_options_are_checked_key_by_key_with_the_form_bounds():
    from alexnet_tasks.config import RECIPE_OPTIONS

    for name, schema in RECIPE_OPTIONS.items():
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if "minimum" in schema:
            PipelineConfig.from_dict({"recipe_options": {name: schema["minimum"]}})
            PipelineConfig.from_dict({"recipe_options": {name: schema["maximum"]}})
            for outside in (schema["minimum"] - 1, schema["maximum"] + 1, float("nan")):
                with pytest.raises(ValueError, match=f"recipe_options.{name} must be"):
                    PipelineConfig.from_dict({"recipe_options": {name: outside}})
        for value in schema.get("enum", []):
            PipelineConfig.from_dict({"recipe_options": {name: value}})
        if "boolean" in kinds:
            PipelineConfig.from_dict({"recipe_options": {name: False}})
        with pytest.raises(ValueError, match=f"recipe_options.{name} must be"):
            PipelineConfig.from_dict({"recipe_options": {name: "not a value"}})
        if "null" in kinds:
            PipelineConfig.from_dict({"recipe_options": {name: None}})
        else:
            with pytest.raises(ValueError, match=f"recipe_options.{name} must be set"):
                PipelineConfig.from_dict({"recipe_options": {name: None}})


@pytest.mark.parametrize(
    ("options", "message"),
    [({"dropuot": 0.3}, r"recipe_options: unknown key\(s\) 'dropuot'; expected some of: momentum"),
     ({"epochs": 3}, "unknown key"),  # a top-level param, not an option
     ({"nesterov": 1}, "recipe_options.nesterov must be true or false, got 1"),
     ({"max_shift": 1.5}, "recipe_options.max_shift must be an integer, got 1.5"),
     ({"decay": "step"}, r"recipe_options.decay must be one of \('constant', 'cosine', 'linear'\), got 'step'"),
     ([["dropout", 0.3]], "recipe_options must be a JSON object")],
)
def test_bad_recipe_options_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict({"recipe_options": options})


def test_no_recipe_options_is_one_setting_whichever_way_it_is_given():
    assert PipelineConfig.from_dict({"recipe_options": {}}).config_digest() == PipelineConfig().config_digest()
    assert PipelineConfig.from_dict({"recipe_options": {"dropout": 0.3}}).config_digest() != \
        PipelineConfig().config_digest()


def test_test_time_augmentation_follows_the_recipe_unless_set():
    assert PipelineConfig().resolved_test_time_augmentation() == "flip"
    assert PipelineConfig(recipe="reference").resolved_test_time_augmentation() == "none"
    assert PipelineConfig(recipe="reference", test_time_augmentation="flip_shift") \
        .resolved_test_time_augmentation() == "flip_shift"
    with pytest.raises(ValueError, match="test_time_augmentation must be one of"):
        PipelineConfig.from_dict({"test_time_augmentation": "mirror"})

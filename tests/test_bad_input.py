"""Bad input gets a clear error, naming the field or file and what is allowed, before any expensive work.

One test per kind of bad input. Where another module already asserts the message, a comment points to
it instead of repeating it here:

* sparsity outside (0, 1] or rounding to zero, patterns matching nothing, unknown score:
  test_select.py::test_bad_input_is_refused_with_a_clear_message (here: that nothing is scored first);
* truncated / missing / foreign mask file: test_mask.py::test_damaged_mask_files_are_refused;
* mask of another model: test_engine.py (sparsify refuses "not in the model" / "does not match");
* truncated delta, other format version, fingerprint mismatch, wrong base model:
  test_delta.py::test_damaged_delta_files_are_refused, ::test_wrong_base_model_is_refused_and_left_untouched;
* checkpoint of another method configuration: test_trainer.py::test_a_checkpoint_of_another_configuration_is_refused;
* unknown names and option typos on the command line: test_cli.py::test_bad_input_exits_with_a_clear_message.
"""

import json
import re
import shutil
from dataclasses import replace

import pytest
import tiny
import torch
import toy_tasks

import saftune
import saftune.run
from saftune import DeltaError, MaskFileError, SparseMask
from saftune.data.base import Split
from saftune.methods import create_method
from saftune.models import create
from saftune.run import RunConfig, run_experiment
from saftune.sparse.mask import MASK_FORMAT, MASK_FORMAT_VERSION
from saftune.train import CheckpointError, TrainConfig, fit

QUICK = {"epochs": 1, "batch_size": 4, "progress": False}


class Expensive(AssertionError):
    """Raised by a stand-in for work that bad input must never reach."""


def _forbid(*_, **__):
    raise Expensive("expensive work started before the input was checked")


@pytest.fixture
def nothing_loads(monkeypatch):
    """run_experiment may neither build a benchmark nor load a model."""
    monkeypatch.setattr("saftune.run.load_dataset", _forbid)
    monkeypatch.setattr("saftune.run.create", _forbid)


@pytest.fixture
def serve_benchmark(monkeypatch):
    """run_experiment gets the given benchmark as "toy-text", and may not load a model."""

    def serve(bench):
        monkeypatch.setattr("saftune.run.load_dataset", lambda name, **options: bench)
        monkeypatch.setattr("saftune.run.create", _forbid)

    return serve


def _config(**values) -> RunConfig:
    return RunConfig.from_dict({"model": "tiny-sentence", "dataset": "toy-text", "method": "saft",
                                "train": QUICK, **values})


class _Untouchable:
    """A data iterable that fails the test when phase 1 starts reading it."""

    def __iter__(self):
        raise Expensive("select_mask read the data before checking its arguments")


def _loss_never_called(model, batch):
    raise Expensive("select_mask computed a loss before checking its arguments")


# -- sparsity and patterns: refused before a single gradient ----------------------------------------

@pytest.mark.parametrize("sparsity, message", [
    (0, r"sparsity must be in \(0, 1\]"),
    (-0.1, r"sparsity must be in \(0, 1\]"),
    (1.5, r"sparsity must be in \(0, 1\]"),
    (float("nan"), r"sparsity must be in \(0, 1\]"),
    ("0.1", r"sparsity must be in \(0, 1\]"),
])
def test_sparsity_outside_0_1_is_refused_before_scoring(sparsity, message):
    with pytest.raises(ValueError, match=message):
        saftune.select_mask(tiny.mlp().model, _loss_never_called, _Untouchable(), sparsity=sparsity)


def test_sparsity_outside_0_1_is_refused_before_any_data_or_model_loads(nothing_loads):
    with pytest.raises(ValueError, match=r"SAFTConfig.sparsity = 0.0 is outside the allowed range \(0.0, 1.0\]"):
        run_experiment(_config(method_options={"sparsity": 0}))


def test_sparsity_rounding_to_zero_entries_names_the_smallest_usable_value():
    model = tiny.mlp().model
    total = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"sparsity=1e-05 selects floor\(1e-05 \* {total}\) = 0 entries; "
                                         rf"use sparsity >= {1 / total:.3g}"):
        saftune.select_mask(model, _loss_never_called, _Untouchable(), sparsity=1e-5)


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_a_pattern_matching_no_parameter_is_named_with_example_names(option):
    with pytest.raises(ValueError, match=rf"{option} pattern 'encoder\.\*' matches no parameter of the model; "
                                         r"parameter names look like \['0.weight', '0.bias', '2.weight'\]"):
        saftune.select_mask(tiny.mlp().model, _loss_never_called, _Untouchable(), sparsity=0.1,
                            **{option: ["encoder.*"]})


# -- datasets: validated before the model is built --------------------------------------------------

def _bench(**changes):
    return replace(toy_tasks.benchmark("text"), name="toy-text", **changes)


def _text_split(name, labels, **fields):
    return Split(name, [f"text {i}" for i in range(len(labels))], labels, **fields)


@pytest.mark.parametrize("split, message", [
    ("train", r"training split 'empty' of dataset 'toy-text' is empty; check the dataset's files and its shots"),
    ("val", r"validation split 'empty' of dataset 'toy-text' is empty; check .* size options \(max_test, max_ood"),
    ("test", r"ID test split 'empty' of dataset 'toy-text' is empty"),
])
def test_an_empty_split_is_refused_before_the_model_loads(serve_benchmark, split, message):
    serve_benchmark(_bench(**{split: _text_split("empty", [])}))
    with pytest.raises(ValueError, match=message):
        run_experiment(_config())


def test_an_empty_ood_split_is_refused(serve_benchmark):
    serve_benchmark(_bench(ood={"shifted": _text_split("shifted", [])}))
    with pytest.raises(ValueError, match=r"OOD test split 'shifted' of dataset 'toy-text' is empty"):
        run_experiment(_config())


def test_a_class_without_a_training_example_is_named(serve_benchmark):
    serve_benchmark(_bench(train=_text_split("movies/train", [0, 0, 0])))
    with pytest.raises(ValueError, match=r"training split 'movies/train' of dataset 'toy-text' has no example of "
                                         r"class 'positive' \(label 1\); every class needs at least one training "
                                         r"example: add examples of it, or remove it from the class names"):
        run_experiment(_config())


def test_an_evaluation_split_may_miss_a_class():
    _bench(test=_text_split("test", [1, 1]), ood={"shifted": _text_split("shifted", [0])}).validate()


@pytest.mark.parametrize("changes, message", [
    # too few names for the labels
    ({"train": _text_split("train", [0, 1, 2, 1])},
     (r"training split 'train' of dataset 'toy-text' has labels \[2\] outside 0..1: its 2 class names "
      r"\('negative', 'positive'\) do not match the labels; give one class name per label")),
    ({"test": _text_split("test", [0, -1])}, r"ID test split 'test' .* has labels \[-1\] outside 0..1"),
    ({"classnames": ["negative", "negative"]},
     r"dataset 'toy-text': classes 0 and 1 are both named 'negative'; class names must be distinct"),
    ({"classnames": ["negative", " "]}, r"dataset 'toy-text': class 1 is named ' '; every class needs a non-empty name"),
    ({"classnames": []}, r"dataset 'toy-text' has no class names"),
    # an OOD split with class names of its own (cross-dataset transfer) that do not cover its labels
    ({"ood": {"pets": _text_split("pets", [0, 1, 2], classnames=["cat", "dog"])}},
     r"OOD test split 'pets' .* has labels \[2\] outside 0..1: its 2 class names \('cat', 'dog'\)"),
    ({"ood": {"a": _text_split("a", [0, 1], class_subset=[1])}},
     r"OOD test split 'a' .* has labels \[1\] outside 0..0: its 1 class names \('positive'\)"),
    ({"ood": {"a": _text_split("a", [0], class_subset=[1, 1])}}, r"class_subset \[1, 1\] must list distinct"),
    ({"train": _text_split("train", [0, 1], classnames=["bad", "good"])},
     r"training split 'train' of dataset 'toy-text' sets classes of its own"),
])
def test_class_names_that_do_not_match_the_labels_are_refused(serve_benchmark, changes, message):
    serve_benchmark(_bench(**changes))
    with pytest.raises(ValueError, match=message):
        run_experiment(_config())


def test_fit_refuses_a_training_split_without_some_class_before_preparing():
    model = create("tiny-sentence")
    model.set_classes(["negative", "positive", "neutral"], ["a {} review."])
    method = create_method("saft", {"sparsity": 0.01})
    method.prepare = _forbid  # phase 1 must not start
    train = _text_split("toy", [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"training split 'toy' has no example of class 'neutral' \(label 2\)"):
        fit(model, method, train, TrainConfig(**QUICK))


def test_the_embedded_and_generated_datasets_pass_validation(require_asset):
    from saftune.run import build_benchmark

    require_asset("vader")
    require_asset("mnist5k")
    for dataset, options in [("toy-text", {}), ("toy-images", {}),
                             ("sentiment-domains", {"shots": 1, "max_test": 20, "max_ood": 20}),
                             ("digits-shift", {"shots": 1, "max_test": 20, "max_ood": 20})]:
        build_benchmark(RunConfig(dataset=dataset, dataset_options=options))  # validates, raises if bad


def test_base_to_new_splits_pass_validation():
    from saftune.data.vision.base2new import subsample_classes

    labels = [0, 1, 2, 3] * 3
    four = toy_tasks.benchmark("text")
    four = replace(four, classnames=["a", "b", "c", "d"], ood={},
                   train=_text_split("train", labels), val=_text_split("val", labels), test=_text_split("test", labels))
    for part in ("base", "new"):
        subsample_classes(four, part).validate()


# -- unknown names: the message lists the known ones ------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("method", "saftt", r"unknown method 'saftt'. Did you mean 'saft'\? Known methods: (.*, )?saft(, .*)?$"),
    ("model", "tiny-clipp", r"unknown model 'tiny-clipp'. Did you mean 'tiny-clip'\? Known models: .*minilm.*tiny-sentence"),
    ("dataset", "toy-txt", r"unknown dataset 'toy-txt'. Did you mean 'toy-text'\? Known datasets: .*sentiment-domains.*toy-images"),
])
def test_an_unknown_name_lists_the_known_ones_before_anything_loads(nothing_loads, field, value, message):
    with pytest.raises(ValueError, match=message):
        run_experiment(_config(**{field: value}))


def test_an_unknown_score_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"SAFTConfig.score = 'gradient' is not allowed; choose from grad, fisher"):
        create_method("saft", score="gradient")


# -- option keys that do not exist: the closest valid key -------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"trian": {}}, r"unknown option 'trian' for RunConfig; did you mean 'train'\? Options: model, "),
    ({"train": {"epoch": 2}}, r"unknown option 'epoch' for TrainConfig; did you mean 'epochs'\?"),
    ({"xyzzy": 1}, r"unknown option 'xyzzy' for RunConfig. Options: model, model_options"),
])
def test_an_unknown_config_key_names_the_closest_valid_one(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(values)


@pytest.mark.parametrize("values, message", [
    ({"method_options": {"sparsty": 0.1}}, r"unknown option 'sparsty' for SAFTConfig; did you mean 'sparsity'\?"),
    ({"dataset_options": {"shot": 4}},
     r"dataset 'toy-text': unknown option 'shot' for ToyOptions; did you mean 'shots'\? Options: shots, seed, "
     r"test_size"),
    ({"model_options": {"sead": 1}}, r"model 'tiny-sentence': unknown option 'sead' for ModelOptions; did you mean "
                                     r"'seed'\?"),
])
def test_an_unknown_builder_or_method_option_is_refused_before_anything_loads(nothing_loads, values, message):
    with pytest.raises(ValueError, match=message):
        run_experiment(_config(**values))


def _registered_datasets():
    from saftune.data.registry import list_datasets

    return sorted(list_datasets())


@pytest.mark.parametrize("name", _registered_datasets())
def test_every_dataset_refuses_a_misspelt_option_with_the_closest_name(name):
    from saftune.data.registry import dataset_options_class, load_dataset

    first = dataset_options_class(name).field_names()[0]
    with pytest.raises(ValueError, match=rf"^dataset '{name}': unknown option '{first}x' for \w+Options; "
                                         rf"did you mean '{first}'\? Options: {first}, "):
        load_dataset(name, **{first + "x": 1})


@pytest.mark.parametrize("spec", ["minilm", "hf-clip:x", "open-clip:x", "sentence:x", "hf-classifier:x", "t5:x",
                                  "efficientnet-lite0", "tiny-sentence", "tiny-clip", "tiny-bert-classifier",
                                  "tiny-t5", "tiny-cnn"])
def test_every_model_takes_the_run_seed_and_refuses_a_misspelt_option(spec):
    from saftune.models.registry import list_models, model_config

    assert spec.partition(":")[0] in {s.partition(":")[0] for s in list_models()}
    assert model_config(spec, {"seed": "3"}).seed == 3  # runs pass their seed to every model
    with pytest.raises(ValueError, match=rf"^model '{spec.partition(':')[0]}': unknown option 'sed' .*did you mean "
                                         r"'seed'\?"):
        create(spec, sed=1)


# -- damaged or foreign files -----------------------------------------------------------------------

def _saved_mask(tmp_path):
    return saftune.select_mask(tiny.mlp().model, sparsity=0.1, score="random").save(tmp_path / "mask.safetensors")


def test_a_corrupt_mask_file_is_named(tmp_path):
    path = _saved_mask(tmp_path)
    path.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(MaskFileError, match=rf"mask file '{re.escape(str(path))}' is truncated or corrupt"):
        SparseMask.load(path)


def test_a_mask_file_of_another_format_version_is_named(tmp_path):
    from safetensors.torch import save_file

    header = {"format": MASK_FORMAT, "format_version": MASK_FORMAT_VERSION + 1, "shapes": {"w": [4]}, "meta": {}}
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.tensor([1], dtype=torch.int32)}, str(path), metadata={"saftune": json.dumps(header)})
    with pytest.raises(MaskFileError, match=rf"'{re.escape(str(path))}' has format version {MASK_FORMAT_VERSION + 1}, "
                                            rf"this saftune reads version {MASK_FORMAT_VERSION}"):
        SparseMask.load(path)


def test_a_mask_of_another_model_is_refused():
    mask = saftune.select_mask(tiny.mlp().model, sparsity=0.1, score="random")
    with pytest.raises(ValueError, match=r"mask parameter '0.weight' is not in the model; was the mask selected on "
                                         r"another model\?"):
        saftune.sparsify(tiny.mha().model, mask)


def _saved_delta(tmp_path):
    case = tiny.mlp()
    mask = saftune.select_mask(case.model, sparsity=0.1, score="random")
    return saftune.sparsify(case.model, mask).delta(base_model="tiny-mlp").save_pretrained(tmp_path / "delta")


def test_a_delta_with_a_corrupt_config_is_named(tmp_path):
    directory = _saved_delta(tmp_path)
    (directory / "saftune_config.json").write_text('{"format": "saftune.sparse_delta", ')
    with pytest.raises(DeltaError, match=r"saftune_config.json' is not valid JSON .*; the delta is damaged"):
        saftune.SparseDelta.from_pretrained(directory)


def test_a_delta_of_another_library_version_names_both_versions(tmp_path):
    directory = _saved_delta(tmp_path)
    config = json.loads((directory / "saftune_config.json").read_text())
    config.update(format_version=2, library_version="9.0")
    (directory / "saftune_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"was written in delta format 2 \(saftune 9.0\); this saftune reads format 1"):
        saftune.SparseDelta.from_pretrained(directory)


def test_a_delta_of_another_base_model_names_it(tmp_path):
    directory = _saved_delta(tmp_path)
    other = tiny.mlp(seed=1).model
    with pytest.raises(DeltaError, match=r"not the base model the delta was trained from \(base tiny-mlp, "
                                         r"fingerprint sha256:"):
        saftune.SparseDelta.from_pretrained(directory).apply_to(other)


CHECKPOINTED = _config(method_options={"sparsity": 0.05, "lr": 1e-3}, train={**QUICK, "checkpoint_every": 1})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_experiment(CHECKPOINTED, out)
    assert (out / "checkpoint" / "trainer.json").is_file()
    return out


@pytest.mark.parametrize("change", [{"seed": 2}, {"dataset_options": {"shots": 4}}, {"model_options": {"seed": 5}},
                                    {"method_options": {"sparsity": 0.1, "lr": 1e-3}}])
def test_a_checkpoint_of_a_run_with_other_settings_is_refused_before_phase_1(finished_run, tmp_path, monkeypatch,
                                                                             change):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    real = saftune.run.create_method

    def without_phase_1(*args, **kwargs):
        method = real(*args, **kwargs)
        method.prepare = _forbid
        return method

    monkeypatch.setattr("saftune.run.create_method", without_phase_1)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*checkpoint' was written by a run with a different "
                                              r"configuration; resume with the same settings, or choose a new output"):
        run_experiment(CHECKPOINTED.replace(**change), out)


def test_on_and_off_from_the_command_line_are_the_option_strings_not_booleans():
    """YAML reads `kernels=on` as True: an option whose values are strings takes it as "on"."""
    from saftune.methods import create_method

    assert create_method("saft", {"kernels": True}).config.kernels == "on"
    assert create_method("saft", {"kernels": False}).config.kernels == "off"
    with pytest.raises(ValueError, match="score"):
        create_method("saft", {"score": True})  # "on" is no score: refused, naming the option

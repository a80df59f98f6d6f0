"""A user's own dataset (bnsuite.register_dataset): trained on like bnsuite's own, fingerprinted by its content,
described in every record so the records load where its plugin is not installed, and every mismatch between
what its function gives and what it was registered as one clear error."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bnsuite.core import registry
from bnsuite.core.datasets import DATASETS, Dataset
from bnsuite.core.records import RecordError, RunRecord, load_records, save_record
from bnsuite.core.registry import PluginError
from bnsuite.core.spec import SpecError
from bnsuite.study import study_from_options
from bnsuite.training import data
from bnsuite.training.data import DatasetError, DataUnavailableError, load_raw, load_splits
from bnsuite.training.models import check_outputs
from bnsuite.training.train import train_seeds


def _digits(train: int = 3_000, test: int = 500):
    """MNIST's first images as four arrays, as a user's own data would come (uint8 images, integer labels)."""
    mnist = load_raw("mnist", data_dir=data.default_data_dir())
    return (mnist.images["train"][:train].copy(), mnist.labels["train"][:train].astype(np.int64),
            torch.from_numpy(mnist.images["test"][:test].copy()), mnist.labels["test"][:test].copy())


def _register(name="my-digits", arrays=None, **description):
    arrays = _digits() if arrays is None else arrays
    registry.register_dataset(name, train_images=description.pop("train_images", 3_000), **description)(
        lambda: arrays)


def test_a_plugins_dataset_trains_and_its_records_carry_its_description_and_content_fingerprint(
        clean_registry, mnist_dir, tmp_path):
    arrays = _digits()
    _register(arrays=arrays, title="my digits")
    # The smoke profile asks for 10,000 held out and 4,000 to train: the dataset has room for a sixth and the rest.
    spec = study_from_options("smoke", studies="batch", dataset="my-digits", variants="plain,bn", batch_sizes="64",
                              seeds="0,1", epochs=1)
    assert (spec.validation_size, spec.train_subset) == (500, 2_500)
    records = [record for group in spec.groups() for record in train_seeds(group, data_dir=mnist_dir, study=spec)]
    described = DATASETS["my-digits"]
    assert described.source.startswith("test_datasets") and described.title == "my digits"
    digest = hashlib.md5()
    for array in (arrays[0][:, None], arrays[1], arrays[2].numpy()[:, None], arrays[3]):  # images as (N, C, H, W)
        digest.update(f"{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes())
    for record in records:
        assert record.dataset == described and record.spec.train_size == 2_500
        assert record.environment.dataset_checksum == digest.hexdigest()
        assert record.test_accuracy > 50  # trained on the digits: one epoch of 40 steps is far above chance
    # Any change of content is another fingerprint.
    changed = (arrays[0], arrays[1].copy(), arrays[2], arrays[3])
    changed[1][0] = (changed[1][0] + 1) % 10
    registry.register_dataset("my-digits-2", train_images=3_000)(lambda: changed)
    assert load_raw("my-digits-2", data_dir=mnist_dir).checksum != digest.hexdigest()
    # Records are data: in a process where no plugin registers it, they load and report.
    results = tmp_path / "results"
    for record in records:
        save_record(record, results)
    script = textwrap.dedent(f"""
        from bnsuite.records import load_records
        from bnsuite.report import build_report
        records = load_records({str(results)!r})
        print(records[0].dataset.title, records[0].spec.train_size, len(records))
        print(build_report({str(results)!r}, out={str(tmp_path / "REPORT.md")!r}, with_plots=False))
        """)
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.split("\n")[0] == "my digits 2500 4"
    assert "profile smoke: my-digits, 1 epochs, 2500 training images (500 validation images)" in shown.stdout
    assert re.search(r"\| bn +\| +64 \|", shown.stdout)  # its runs in the final-epoch table


def test_a_record_of_a_dataset_registered_otherwise_here_is_refused_naming_both(clean_registry, mnist_dir, tmp_path):
    _register(arrays=_digits(600, 100), train_images=600)
    spec = study_from_options("smoke", studies="batch", dataset="my-digits", variants="bn", batch_sizes="64",
                              seeds="1", epochs=1)
    (record,) = train_seeds(spec.groups()[0], data_dir=mnist_dir, study=spec)
    raw = json.loads(record.to_json())
    assert RunRecord.from_json(json.dumps(raw)) == record
    raw["dataset"]["classes"] = 5
    with pytest.raises(RecordError, match=r"^saved\.json describes the dataset 'my-digits' otherwise than "
                                          r"test_datasets .* registers it here \(classes 10 against 5\)"):
        RunRecord.from_json(json.dumps(raw), source="saved.json")
    raw["dataset"] = None  # a plugin's dataset without its description
    with pytest.raises(RecordError, match="field dataset is missing: the run trained on 'my-digits'"):
        RunRecord.from_json(json.dumps(raw))
    raw["dataset"] = {**json.loads(record.to_json())["dataset"], "name": "mnist"}  # not the run's
    with pytest.raises(RecordError, match="dataset"):
        RunRecord.from_json(json.dumps(raw))
    # Where the dataset is known from records only, its images are not: one line says what to install.
    save_record(record, tmp_path / "results")
    DATASETS.pop("my-digits")
    registry._DATASET_LOADERS.pop("my-digits")
    data._registered.cache_clear()
    load_records(tmp_path / "results")
    with pytest.raises(DataUnavailableError, match="known here only from records"):
        load_splits("my-digits", validation_size=100, data_dir=mnist_dir)
    # Its plugin imported after the records were read takes the name over, and trains; a plugin whose dataset of
    # that name differs is refused.
    with pytest.raises(PluginError, match=r"dataset 'my-digits' of test_datasets .* differs from the records read "
                                          r"before \(train_images 600 against 700, "):
        _register(arrays=_digits(700, 100), train_images=700)
    _register(arrays=_digits(600, 100), train_images=600)
    assert load_splits("my-digits", validation_size=100, data_dir=mnist_dir).train_images.shape[0] == 500


@pytest.mark.parametrize(("arrays", "message"), [
    (lambda d: d[:3], r"must return four arrays \(training images, .*\), got a tuple of 3"),
    (lambda d: (d[0][:10], *d[1:]), r"training images are 10, but the dataset is registered with train_images=3000"),
    (lambda d: (d[0].reshape(3_000, 784), *d[1:]), r"training images have shape \(3000, 784\); they must be "
                                                   r"\(N, 1, 28, 28\) or \(N, 28, 28\)"),
    (lambda d: (d[0].astype(np.float32), *d[1:]), "training images are float32; with a normalization they must "
                                                  "be uint8"),
    (lambda d: (*d[:3], d[3] + 10), r"test labels run from 10 to 19; they must be 0 to 9"),
    (lambda d: (d[0], d[1][:5], *d[2:]), r"training labels are int64 of shape \(5,\); they must be integers of "
                                         r"shape \(3000,\)"),
    (lambda d: (d[0], d[1].tolist(), *d[2:]), "training labels are a list; give a numpy array or a torch tensor"),
])
def test_arrays_that_do_not_match_the_registered_description_are_one_clear_error(clean_registry, tmp_path,
                                                                                   arrays, message):
    _register(arrays=arrays(_digits()))
    with pytest.raises(DatasetError, match=r"^the dataset 'my-digits' \(test_datasets:.*\)(: its)? " + message):
        load_raw("my-digits", data_dir=tmp_path)


def test_float_images_are_taken_as_they_are_and_a_loader_that_raises_is_one_line_naming_it(clean_registry,
                                                                                            tmp_path):
    images, labels, test_images, test_labels = _digits(600, 100)
    floats = (images.astype(np.float32) / 255, labels, test_images.numpy().astype(np.float32) / 255, test_labels)
    registry.register_dataset("my-floats", train_images=600, normalization=None)(lambda: floats)
    splits = load_splits("my-floats", validation_size=100, data_dir=tmp_path)
    assert splits.train_images.shape == (500, 1, 28, 28) and float(splits.train_images.max()) == 1.0

    @registry.register_dataset("my-broken", train_images=600)
    def my_broken():
        return np.load(tmp_path / "missing.npz")

    with pytest.raises(DatasetError, match=r"^the dataset 'my-broken' \(test_datasets:.*my_broken\) raised "
                                           r"FileNotFoundError, at .*test_datasets\.py line \d+: .*missing\.npz"):
        load_raw("my-broken", data_dir=tmp_path)


def test_a_dataset_registration_is_checked_when_made(clean_registry):
    with pytest.raises(PluginError, match=r"dataset 'mnist' is registered twice \(bnsuite and test_datasets"):
        _register("mnist")
    with pytest.raises(PluginError, match="dataset name 'my digits' must be letters"):
        _register("my digits")
    with pytest.raises(PluginError, match=r"image_shape must be \(channels, height, width\)"):
        _register(image_shape=(28, 28))
    with pytest.raises(PluginError, match="validation_images must be an integer between 1 and 2999"):
        _register(validation_images=3_000)
    with pytest.raises(PluginError, match="normalization must be .* one value per channel \\(3\\)"):
        _register(image_shape=(3, 32, 32))
    with pytest.raises(PluginError, match="networks must be some of bnsuite's mlp, cnn"):
        _register(networks=("resnet",))
    _register("my-colour", image_shape=(3, 32, 32), normalization=((0.5,) * 3, (0.25,) * 3))
    assert DATASETS["my-colour"].networks == ("cnn",)  # the study's MLP takes 28x28 grey images only
    assert DATASETS["my-colour"].validation_images == 500
    with pytest.raises(SpecError, match="the mlp network cannot train on my-colour"):
        study_from_options("smoke", studies="batch", dataset="my-colour")
    with pytest.raises(SpecError, match=r"unknown dataset 'theirs'; choose from: mnist, .*my-colour \(a dataset of "
                                        r"your own is registered by a plugin"):
        study_from_options("smoke", studies="batch", dataset="theirs")
    assert isinstance(DATASETS["my-colour"], Dataset) and not DATASETS["my-colour"].builtin


BROKEN_DIGITS = '''
import numpy as np
import bnsuite


@bnsuite.register_dataset("my-digits", train_images=12_000)
def my_digits():
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    return images, np.zeros(10, dtype=np.int64), images, np.zeros(10, dtype=np.int64)
'''


def test_a_plugins_dataset_that_does_not_match_stops_the_study_before_anything_trains(clean_registry, pytester,
                                                                                       tmp_path):
    pytester.makepyfile(broken_digits=BROKEN_DIGITS)
    results = tmp_path / "results"
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--pyargs", "bnsuite.benchmarks.test_study", "--bn-plugin", "broken_digits",
        "--bn-profile", "smoke", "--bn-studies", "batch", "--bn-dataset", "my-digits", "--bn-results-dir",
        str(results))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: bnsuite: the dataset 'my-digits' (broken_digits:my_digits): its training "
                                 "images are 10, but the dataset is registered with train_images=12000; register "
                                 "it with the number it has"])
    assert "Traceback" not in result.stderr.str() and not [path for path in results.rglob("*") if path.is_file()]


def test_the_built_in_networks_give_one_logit_per_class_of_a_dataset_with_fewer_classes(clean_registry, mnist_dir):
    images, labels, test_images, test_labels = _digits(3_000, 500)
    keep, keep_test = labels < 4, test_labels < 4  # the digits 0 to 3: four classes
    four = (images[keep], labels[keep], test_images[torch.from_numpy(keep_test)], test_labels[keep_test])
    registry.register_dataset("my-four", train_images=int(keep.sum()), classes=4)(lambda: four)
    spec = study_from_options("smoke", studies="batch", dataset="my-four", variants="plain,bn", batch_sizes="64",
                              seeds="0-0", epochs=1, network="mlp,cnn")
    check_outputs(spec)  # every variant on both networks gives (2, 4)
    records = [record for group in spec.groups() for record in train_seeds(group, data_dir=mnist_dir, study=spec)]
    trained = {(r.spec.network, r.spec.variant) for r in records}
    assert trained == {(network, variant) for network in ("mlp", "cnn") for variant in ("plain", "bn")}
    assert all(r.test_accuracy > 60 for r in records)  # chance is 25%
    # A plugin's builder that does not take `classes` gives its own logits: ten are refused before anything trains.
    registry.register_variant("tens", batch_statistics=False)(lambda: torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    with pytest.raises(SpecError, match=r"the variant 'tens' on the mlp network gives \(2, 10\) for 2 images of "
                                        r"my-four .* it must give \(2, 4\)"):
        check_outputs(study_from_options("smoke", studies="batch", dataset="my-four", variants="plain,tens"))

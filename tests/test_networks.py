"""The network axis and the ConvNet: runs, case ids, claims and records carry the network; the MLP's names and
files stay what they were; the ConvNet's layers, its normalizations and its training are pinned."""

import dataclasses

import pytest
import torch
from torch import nn

from bnsuite.core.claims import study_claims
from bnsuite.core.registry import register_variant, variant, variant_names
from bnsuite.core.spec import RunSpec, SpecError, Study
from bnsuite.study import study_from_options
from bnsuite.training import fused
from bnsuite.training.batchnorm import GhostBatchNorm2d, ScratchGroupNorm
from bnsuite.training.models import SmallCNN, build_model, parameter_count
from bnsuite.training.speed import activation_widths, training_flops_per_sample
from bnsuite.training.train import train_seeds


def test_the_mlp_s_case_ids_and_fingerprints_are_what_they_were_and_the_convnet_s_are_its_own():
    mlp = RunSpec(variant="bn", batch_size=64, seed=0)
    assert mlp.case_id == "bn-bs64-seed0"
    assert mlp.fingerprint == RunSpec(variant="bn", batch_size=64, seed=0, network="mlp").fingerprint
    cnn = dataclasses.replace(mlp, network="cnn")
    assert cnn.case_id == "cnn-bn-bs64-seed0" and cnn.fingerprint != mlp.fingerprint


def test_a_schema_7_file_name_is_the_fingerprint_of_its_spec_without_the_network():
    # The smoke reference's bn at batch 64, seed 0 (its committed file name).
    spec = RunSpec(variant="bn", batch_size=64, seed=0, epochs=2, validation_size=10_000, train_subset=4_000)
    assert f"{spec.case_id}-{spec.fingerprint}.json" == "bn-bs64-seed0-7a5bc81efe.json"


def test_the_mlp_takes_no_cifar_and_an_unknown_network_is_refused_with_the_choices():
    with pytest.raises(SpecError, match="the mlp network cannot train on cifar10.*--bn-network cnn"):
        RunSpec(dataset="cifar10")
    with pytest.raises(SpecError, match="unknown network 'resnet'; choose one of: mlp, cnn"):
        RunSpec(network="resnet")
    assert RunSpec(dataset="cifar10", network="cnn", validation_size=0).train_size == 50_000


def test_bn_network_cnn_runs_the_studies_that_take_it_and_leaves_out_the_others():
    spec = study_from_options("smoke", network="cnn")
    assert [(study.name, study.networks) for study in spec.studies] == [
        ("batch", ("cnn",)), ("lr", ("cnn",)), ("ghost", ("cnn",))]
    assert all(run.network == "cnn" for run in spec.run_specs())
    assert spec.case_name(spec.groups()[0]) == "cnn-plain-bs32"
    with pytest.raises(SpecError, match="no study chosen trains on cnn; the studies that do: batch, lr, ghost, "
                                        "placement"):
        study_from_options("smoke", network="cnn", studies="dropout")  # the ConvNet takes no dropout
    with pytest.raises(SpecError, match="unknown network 'vit'"):
        study_from_options("smoke", network="vit")


def test_both_networks_give_each_study_its_runs_and_claims_network_by_network():
    both = study_from_options("smoke", network="mlp,cnn", studies="batch")
    mlp = study_from_options("smoke", studies="batch")
    names = [claim.name for claim in study_claims(both)]
    mlp_names = [claim.name for claim in study_claims(mlp)]
    assert names[:len(mlp_names)] == mlp_names  # the MLP's claims, named as they always were
    # The same claims on the ConvNet, but for the activations' (its feature maps are not probed).
    assert names[len(mlp_names):] == [f"cnn-{name}" for name in mlp_names if "steadier-activations" not in name]
    for claim in study_claims(both):  # each judges the runs of its own network only
        assert {run.network for run in claim.needs} == {claim.network}
        assert claim.network == "mlp" or claim.statement.startswith("On the ConvNet: ")
    assert len(both.run_specs()) == 2 * len(mlp.run_specs())


def test_the_convnet_trains_its_own_epochs_unless_bn_epochs_sets_every_network_s():
    spec = study_from_options("full", network="mlp,cnn", studies="batch")
    assert {(run.network, run.epochs) for run in spec.run_specs()} == {("mlp", 10), ("cnn", 10)}
    spec = study_from_options("quick", network="mlp,cnn", studies="batch")
    assert {(run.network, run.epochs) for run in spec.run_specs()} == {("mlp", 4), ("cnn", 2)}
    spec = study_from_options("full", network="mlp,cnn", studies="batch", epochs=1)
    assert {(run.network, run.epochs) for run in spec.run_specs()} == {("mlp", 1), ("cnn", 1)}


def test_a_normalization_is_registered_once_and_goes_into_every_network_whose_slots_it_fits():
    assert variant("bn", "cnn").network == "cnn" and variant("bn").network == "mlp"
    assert variant("bn", "cnn").builder == variant("bn").builder == "bnsuite.models:bn"
    assert type(build_model("bn", network="cnn").bn1) is nn.BatchNorm2d
    assert type(build_model("bn").bn1) is nn.BatchNorm1d
    assert "gn" in variant_names("cnn") and "gn" not in variant_names("mlp")
    with pytest.raises(SpecError, match=r"variant 'bn-noisy' cannot go into the ConvNet \(cnn\): its normalization "
                       "slots take channels, and bn-noisy normalizes features only; choose one of: plain, bn"):
        variant("bn-noisy", "cnn")
    with pytest.raises(SpecError, match="unknown variant 'ioffe-bn' of the cnn network"):
        variant("ioffe-bn", "cnn")  # a variant built whole is its network's only
    with pytest.raises(Exception, match="registered twice"):
        register_variant("bn", network="cnn", batch_statistics=True)(lambda image_shape: None)


def test_the_convnet_s_layers_and_parameter_counts():
    assert parameter_count(build_model("plain", network="cnn")) == 9_098
    for name in ("bn", "bn-ghost8", "ln", "gn"):
        assert parameter_count(build_model(name, network="cnn")) == 9_146
    assert parameter_count(build_model("bn", network="cnn", image_shape=(3, 32, 32))) == 11_690
    model = build_model("bn", network="cnn")
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == {
        "conv1.weight": (8, 1, 3, 3), "conv1.bias": (8,), "bn1.weight": (8,), "bn1.bias": (8,),
        "conv2.weight": (16, 8, 3, 3), "conv2.bias": (16,), "bn2.weight": (16,), "bn2.bias": (16,),
        "fc.weight": (10, 784), "fc.bias": (10,)}
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(build_model("plain", network="cnn").bn1, nn.Identity)
    assert model(torch.zeros(5, 784)).shape == (5, 10)  # a flat batch, as the tensor epochs slice it
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_init_scale_multiplies_the_convolutions_weights_too():
    torch.manual_seed(0)
    base = build_model("bn", network="cnn")
    torch.manual_seed(0)
    scaled = build_model("bn", 10.0, network="cnn")
    assert torch.equal(scaled.conv1.weight, base.conv1.weight * 10) and torch.equal(scaled.conv1.bias, base.conv1.bias)
    assert torch.equal(scaled.fc.weight, base.fc.weight * 10) and torch.equal(scaled.bn1.weight, base.bn1.weight)


def test_group_norm_and_layer_norm_on_feature_maps_match_the_written_out_version():
    x = torch.randn(6, 16, 7, 7, dtype=torch.float64)
    for groups in (1, 4):
        torch_layer, scratch = nn.GroupNorm(groups, 16).double(), ScratchGroupNorm(groups, 16).double()
        with torch.no_grad():
            for layer in (torch_layer, scratch):
                layer.weight.copy_(torch.linspace(0.5, 1.5, 16))
                layer.bias.copy_(torch.linspace(-1, 1, 16))
        torch.testing.assert_close(torch_layer(x), scratch(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scratch(x.contiguous(memory_format=torch.channels_last)), scratch(x))


def test_ghost_batch_norm_2d_is_batchnorm2d_per_ghost_batch_over_every_position():
    x = torch.randn(12, 8, 5, 5, dtype=torch.float64)
    ghost = GhostBatchNorm2d(8, 4).double()
    expected = torch.cat([nn.BatchNorm2d(8).double()(x[start:start + 4]) for start in range(0, 12, 4)])
    torch.testing.assert_close(ghost(x), expected, rtol=1e-12, atol=1e-12)
    first = nn.BatchNorm2d(8).double()
    first(x[:4])  # the running estimates follow the first ghost batch, with BatchNorm2d's unbiased variance
    torch.testing.assert_close(ghost.running_mean, first.running_mean)
    torch.testing.assert_close(ghost.running_var, first.running_var)
    whole, full = GhostBatchNorm2d(8, 16).double(), nn.BatchNorm2d(8).double()
    torch.testing.assert_close(whole(x), full(x), rtol=1e-12, atol=1e-12)  # a ghost batch of the whole batch
    ghost.eval(), first.eval()
    torch.testing.assert_close(ghost(x), first(x), rtol=1e-12, atol=1e-12)


def test_the_convnet_s_training_flops_count_its_convolutions_and_classifier():
    model = build_model("bn", network="cnn")
    conv1, conv2, fc = 2 * 9 * 1 * 8 * 28 * 28, 2 * 9 * 8 * 16 * 14 * 14, 2 * 784 * 10
    assert training_flops_per_sample(model) == 2 * conv1 + 3 * conv2 + 3 * fc  # no input gradient for the image


def test_the_training_flops_count_products_no_linear_module_runs_and_change_nothing():
    class Factored(torch.nn.Module):  # a user's network: its products in torch.matmul, no Linear, no Conv2d
        image_shape = (1, 28, 28)

        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Parameter(torch.randn(784, 32)), torch.nn.Parameter(torch.randn(32, 10))
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, images):
            return self.drop(torch.relu(images.flatten(1) @ self.first)) @ self.second

    model = Factored()
    state, before = torch.random.get_rng_state(), {name: value.clone() for name, value in model.state_dict().items()}
    # the first product's forward and weight gradient (the image needs no gradient), the second's three passes
    assert training_flops_per_sample(model) == 2 * (2 * 784 * 32) + 3 * (2 * 32 * 10)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())
    # Its least traffic, measured where no Linear says it: the dropout's 32 outputs, the logits and log-probabilities
    assert activation_widths(model) == (32 + 2 * 10, 32 + 10)


@pytest.fixture(scope="module")
def convnet_runs(mnist_dir):
    group = tuple(RunSpec(variant="bn", network="cnn", batch_size=64, epochs=1, seed=seed, train_subset=1_024,
                          validation_size=10_000) for seed in (0, 1))
    return None, group, train_seeds(group, data_dir=mnist_dir)


def test_the_convnet_trains_its_seeds_together_on_the_fused_step_and_records_its_network(convnet_runs):
    study, group, records = convnet_runs
    step = fused.build().step_name if fused.supports(build_model("bn", network="cnn"), 64) else "eager"
    for spec, record in zip(group, records, strict=True):
        assert record.spec == spec and record.spec.network == "cnn" and record.variant == variant("bn", "cnn")
        assert record.training_step == step
        assert record.runs_trained_together == (2 if step != "eager" else 1)
        assert record.test_accuracy > 30  # 16 steps on 1,024 images start to train it
        assert record.filename.startswith(f"cnn-bn-bs64-seed{spec.seed}-")
    assert records[0].train_losses != records[1].train_losses


def test_a_convnet_run_is_bit_identical_when_trained_again(convnet_runs, mnist_dir):
    study, group, records = convnet_runs
    (again,) = train_seeds(group[:1], data_dir=mnist_dir)
    assert again.train_losses == records[0].train_losses and again.test_accuracy == records[0].test_accuracy
    assert again.epochs[-1].validation_loss == records[0].epochs[-1].validation_loss


def test_a_study_of_a_plugin_may_take_the_convnet_only_if_it_says_so():
    assert Study("x", variants=("bn",), batch_sizes=(64,), epochs=1, networks=("cnn",)).epochs_on("cnn") == 1
    with pytest.raises(SpecError, match="unknown networks 'rnn'"):
        Study("x", variants=("bn",), batch_sizes=(64,), epochs=1, networks=("rnn",))
    model = SmallCNN((3, 32, 32))
    assert model.fc.in_features == 16 * 8 * 8


# --- a network of a plugin's (bnsuite.registry.register_network) ---


class TinyResidual(nn.Module):
    """784 -> 32, one residual block x + Linear(ReLU(norm(x))), then 32 -> classes: a user's network."""

    def __init__(self, norm, classes):
        super().__init__()
        self.stem = nn.Linear(784, 32)
        self.block = nn.Sequential(norm(32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x.flatten(1))
        return self.head(x + self.block(x))


def _register_tiny(**settings):
    from bnsuite import register_network

    @register_network("tiny", title="tiny residual net", slots="features", image_shape=(1, 28, 28),
                      probe="block.0", **settings)
    def tiny(norm, *, image_shape, classes):
        return TinyResidual(norm, classes)

    return tiny


def test_a_plugins_network_is_built_with_bnsuite_s_normalizations_in_its_slots(clean_registry):
    _register_tiny()
    assert type(build_model("plain", network="tiny").block[0]) is nn.Identity
    assert type(build_model("bn", network="tiny").block[0]) is nn.BatchNorm1d
    assert type(build_model("bn-ghost8", network="tiny").block[0]).__name__ == "GhostBatchNorm1d"
    assert build_model("ln", network="tiny", classes=4)(torch.rand(2, 784)).shape == (2, 4)
    described = variant("bn", "tiny")
    assert (described.builder, described.source, described.probe) == ("bnsuite.models:bn", "bnsuite", "block.0")
    assert "gn" not in variant_names("tiny") and "bn-dropout" not in variant_names("tiny")


def test_the_batch_study_runs_on_a_plugins_network_and_its_claims_compare_bn_with_plain_there(clean_registry):
    _register_tiny(epochs={"smoke": 1})
    spec = study_from_options("smoke", studies="batch,init", network="tiny")
    assert [study.name for study in spec.studies] == ["batch"]  # the init study takes the MLP only
    assert {(run.network, run.variant, run.epochs) for run in spec.run_specs()} == {
        ("tiny", "plain", 1), ("tiny", "bn", 1)}  # its own epochs under the smoke profile
    assert [network.name for network in spec.networks] == ["tiny"] and not spec.networks[0].builtin
    claims = {claim.name: claim for claim in study_claims(spec)}
    assert "tiny-bn-lower-final-loss-bs128" in claims
    assert claims["tiny-bn-lower-final-loss-bs128"].statement.startswith("On the tiny residual net: ")
    assert {run.epochs for run in study_from_options("quick", studies="batch", network="tiny").run_specs()} == {4}
    with pytest.raises(SpecError, match=r"variant 'gn' cannot go into the tiny residual net \(tiny\)"):
        study_from_options("smoke", studies="batch", network="tiny", variants="plain,gn")


def test_a_network_registration_is_checked_when_made(clean_registry):
    from bnsuite import register_network
    from bnsuite.core.registry import PluginError

    def build(norm, *, image_shape, classes):
        return None

    with pytest.raises(PluginError, match=r"network 'mlp' is registered twice \(bnsuite and test_networks"):
        register_network("mlp", title="mine", slots="features")(build)
    with pytest.raises(PluginError, match="network name 'any' must be letters"):
        register_network("any", title="mine", slots="features")(build)
    with pytest.raises(PluginError, match="slots must be one of features, channels, got 'maps'"):
        register_network("mine", title="mine", slots="maps")(build)
    with pytest.raises(PluginError, match=r"image_shape must be \(channels, height, width\)"):
        register_network("mine", title="mine", slots="features", image_shape=(28, 28))(build)
    with pytest.raises(PluginError, match="epochs must map profile names to whole numbers > 0"):
        register_network("mine", title="mine", slots="features", epochs={"smoke": 0})(build)


def test_a_record_of_a_plugins_network_loads_without_the_plugin_and_training_it_there_says_what_to_install(
        clean_registry, mnist_dir):
    from bnsuite.core import networks, registry
    from bnsuite.core.records import RecordError, RunRecord

    _register_tiny()
    spec = study_from_options("smoke", studies="batch", network="tiny", variants="bn", batch_sizes="64", seeds="1",
                              epochs="1")
    (record,) = train_seeds(spec.run_specs(), data_dir=mnist_dir, study=spec)
    assert record.filename.startswith("tiny-bn-bs64-seed0-") and record.activations is not None
    text = record.to_json()
    described = networks.NETWORKS.pop("tiny")  # a process where the plugin is not installed
    registry._NETWORK_BUILDERS.pop("tiny")
    again = RunRecord.from_json(text)
    assert again == record and networks.NETWORKS["tiny"] == described
    with pytest.raises(SpecError, match="the network 'tiny' is known here only from records"):
        registry.builder("bn", "tiny")
    _register_tiny()  # the plugin, imported after: it takes the name over, its registration agreeing
    assert "tiny" not in networks.NETWORKS.from_records and registry.builder("bn", "tiny")
    networks.NETWORKS["tiny"] = dataclasses.replace(described, slots="channels")  # another network of that name
    with pytest.raises(RecordError, match="describes the network 'tiny' otherwise than test_networks"):
        RunRecord.from_json(text)


def test_a_run_of_a_plugins_network_outside_a_study_describes_the_network_and_loads_without_the_plugin(
        clean_registry, mnist_dir):
    """train(spec) records no study; the record describes the plugin's network itself (schema 15), and a run of
    bnsuite's own network describes none (bnsuite.networks does)."""
    from bnsuite.core import networks, registry
    from bnsuite.core.records import RunRecord
    from bnsuite.core.spec import RunSpec
    from bnsuite.training.train import train

    _register_tiny()
    record = train(RunSpec(variant="bn", network="tiny", epochs=1, train_subset=256), data_dir=mnist_dir)
    assert record.study is None and record.network == networks.NETWORKS["tiny"]
    text = record.to_json()
    described = networks.NETWORKS.pop("tiny")  # a process where the plugin is not installed
    registry._NETWORK_BUILDERS.pop("tiny")
    assert RunRecord.from_json(text) == record and networks.NETWORKS["tiny"] == described
    assert train(RunSpec(variant="bn", epochs=1, train_subset=256), data_dir=mnist_dir).network is None


class BatchRMS(nn.Module):
    """A user's normalization: each feature over its batch root mean square, no eps or momentum attribute."""

    def forward(self, x):
        return x / x.pow(2).mean(0).add(1e-5).sqrt()


def test_a_users_normalization_goes_into_the_mlp_and_the_fast_steps_leave_it_to_the_eager_step(clean_registry):
    from bnsuite import register_normalization
    from bnsuite.training import fastpath

    register_normalization("batch-rms", batch_statistics=True, slots=("features",))(lambda size, slots: BatchRMS())
    model = build_model("batch-rms")
    assert type(model.bn1) is BatchRMS and variant("batch-rms").probe == "bn2"
    assert fused.mlp_layout(model) is None and not fused.supports(model, 64) and not fastpath.supports(model)
    with pytest.raises(SpecError, match="variant 'batch-rms' cannot go into the ConvNet"):
        build_model("batch-rms", network="cnn")


def _register_tiny_with_placements(built: list):
    from bnsuite import register_network

    @register_network("tiny2", title="tiny residual net", slots="features", image_shape=(1, 28, 28),
                      probe="block.0", probe_without_norm="stem", placements=("before", "after"), dropout=True)
    def tiny2(norm, *, image_shape, classes, placement="before", dropout=0.0):
        built.append((placement, dropout))
        return TinyResidual(norm, classes)


def test_placement_and_dropout_go_into_every_network_that_says_it_takes_them(clean_registry):
    built = []
    _register_tiny_with_placements(built)
    for name, asked in (("bn", ("before", 0.0)), ("bn-after-relu", ("after", 0.0)), ("bn-dropout", ("before", 0.2)),
                        ("plain-dropout", ("before", 0.2))):
        built.clear()
        build_model(name, network="tiny2")
        assert built == [asked], name
    after, dropout = variant("bn-after-relu", "tiny2"), variant("bn-dropout", "tiny2")
    assert (after.placement, after.probe, after.builder) == ("after", "stem", "bnsuite.models:bn")
    assert (dropout.dropout, dropout.probe) == (0.2, "block.0")
    spec = study_from_options("smoke", studies="placement,dropout", network="tiny2")
    assert {(run.variant, run.network) for run in spec.run_specs()} == {
        ("bn", "tiny2"), ("bn-after-relu", "tiny2"), ("plain", "tiny2"), ("plain-dropout", "tiny2"),
        ("bn-dropout", "tiny2")}
    assert "tiny2-bn-after-relu-accuracy-at-least-before-bs64" in {claim.name for claim in study_claims(spec)}


def test_a_network_that_does_not_take_placement_or_dropout_is_refused_them_in_one_line(clean_registry):
    _register_tiny()  # its builder takes neither keyword
    with pytest.raises(SpecError, match=r"variant 'bn-after-relu' cannot go into the tiny residual net \(tiny\): "
                                        "bn-after-relu sits after each hidden nonlinearity, and its slots sit before "
                                        "it only; choose one of: plain, bn,"):
        variant("bn-after-relu", "tiny")
    with pytest.raises(SpecError, match=r"variant 'bn-dropout' cannot go into the tiny residual net \(tiny\): "
                                        r"bn-dropout drops out after each hidden nonlinearity, and its builder takes "
                                        r"no dropout \(register_network\(dropout=True\) says it does\)"):
        variant("bn-dropout", "tiny")
    # The studies that need them leave the network out, as for any network a study does not take.
    with pytest.raises(SpecError, match=r"no study chosen trains on tiny; the studies that do: batch, lr, ghost "
                                        r"\(choose them with --bn-studies\); dropout: variant 'plain-dropout' "
                                        r"cannot go into the tiny residual net \(tiny\): plain-dropout drops out "
                                        r"after each hidden "
                                        r"nonlinearity, and its builder takes no dropout \(.*\); placement: variant "
                                        r"'bn-after-relu' cannot go into"):
        study_from_options("smoke", studies="placement,dropout", network="tiny")
    from bnsuite import register_network
    from bnsuite.core.registry import PluginError
    with pytest.raises(PluginError, match="placements must be 'before', then 'after'"):
        register_network("mine", title="mine", slots="features", placements=("after",))(lambda norm, **kw: None)


@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_the_slots_after_the_relu_and_dropout_are_the_same_layers_in_another_order(network):
    """bn-after-relu is bn's network with each slot after its ReLU (the same parameters from the same seed), and
    dropout goes after the ReLU and the slot (the MLP's; the ConvNet takes none). BN after the ReLU trains on the
    MLP's fused step, not on the ConvNet's, which covers BN before it only."""
    torch.manual_seed(0)
    before = build_model("bn", network=network)
    torch.manual_seed(0)
    after = build_model("bn-after-relu", network=network)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values(),
                                                  strict=True))
    images = torch.randn(8, 784)
    first = before.conv1 if network == "cnn" else before.fc1
    shaped = images.view(8, 1, 28, 28) if network == "cnn" else images
    before.train(), after.train()
    out = after.bn1(torch.relu(first(shaped)))
    hook = []
    after.bn1.register_forward_hook(lambda module, args, output: hook.append(output))
    after(images)
    torch.testing.assert_close(hook[0], out)
    assert torch.relu(before.bn1(first(shaped))).min() >= 0 and out.min() < 0  # BN's output is not clipped after it
    if network == "cnn":
        assert fused.conv_normalization(before) is not None and fused.conv_normalization(after) is None
        with pytest.raises(SpecError, match=r"variant 'bn-dropout' cannot go into the ConvNet \(cnn\)"):
            variant("bn-dropout", "cnn")  # ConvNets of its kind leave dropout out
        return
    torch.manual_seed(0)
    dropping = build_model("bn-dropout", network=network).train()
    seen = []
    dropping.dropout.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    dropping(images)
    (given, dropped), _ = seen
    torch.testing.assert_close(given, torch.relu(dropping.bn1(first(shaped))))  # after the ReLU and the slot
    kept = dropped != 0
    assert dropping.dropout.p == 0.2 and 0.6 < kept[given != 0].float().mean() < 0.95
    torch.testing.assert_close(dropped[kept], given[kept] / 0.8)
    assert fused.mlp_layout(after).after_relu and not fused.mlp_layout(before).after_relu
    assert fused.mlp_layout(dropping) == fused.mlp_layout(before)

import pytest
import torch
from torch import nn

from bnsuite.core.registry import variant, variant_names
from bnsuite.training.models import SimpleNN, SimpleNNWithBN, build_model, parameter_count
from bnsuite.training.probe import probed_input
from bnsuite.training.speed import training_flops_per_sample


def test_parameter_counts_are_the_studys():
    assert parameter_count(build_model("plain")) == 235_146
    assert parameter_count(build_model("bn")) == 235_914
    assert parameter_count(build_model("bn-scratch")) == 235_914
    assert parameter_count(build_model("bn-ghost2")) == parameter_count(build_model("ln")) == 235_914
    for name in ("bn-after-relu", "bn-noisy", "bn-renorm2"):  # the field's explanations change no parameter
        assert parameter_count(build_model(name)) == 235_914


def test_bn_after_relu_normalizes_each_relu_s_output_and_initializes_as_bn_does():
    torch.manual_seed(0)
    before = build_model("bn")
    torch.manual_seed(0)
    after = build_model("bn-after-relu")
    pairs = zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    x = torch.randn(32, 1, 28, 28)
    seen = {}
    after.bn1.register_forward_hook(lambda module, args, output: seen.update(bn1_input=args[0]))
    after(x)
    assert (seen["bn1_input"] >= 0).all()  # BN sees the ReLU's output
    assert not torch.allclose(before(x), after(x))


@pytest.mark.parametrize("name", sorted(variant_names("mlp")))
def test_every_variant_maps_a_batch_of_images_to_ten_logits(name):
    model = build_model(name)
    assert model(torch.zeros(8, 1, 28, 28)).shape == (8, 10)


def test_layers_have_the_studys_names_and_shapes():
    plain = dict(SimpleNN().named_parameters())
    assert {name: tuple(p.shape) for name, p in plain.items()} == {
        "fc1.weight": (256, 784), "fc1.bias": (256,), "fc2.weight": (128, 256), "fc2.bias": (128,),
        "fc3.weight": (10, 128), "fc3.bias": (10,),
    }
    torch.manual_seed(5)
    built = build_model("plain")  # SimpleNNWithBN with nothing in its slots: SimpleNN's parameters and init
    torch.manual_seed(5)
    assert all(torch.equal(value, plain_again) for value, plain_again in zip(
        built.state_dict().values(), SimpleNN().state_dict().values(), strict=True))
    assert list(built.state_dict()) == list(plain)
    with_bn = SimpleNNWithBN()
    assert isinstance(with_bn.bn1, nn.BatchNorm1d) and with_bn.bn1.num_features == 256
    assert isinstance(with_bn.bn2, nn.BatchNorm1d) and with_bn.bn2.num_features == 128


def test_same_seed_gives_the_same_default_initialization():
    torch.manual_seed(3)
    first = build_model("bn").state_dict()
    torch.manual_seed(3)
    second = build_model("bn").state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown variant 'resnet'; choose one of: plain, bn, plain-dropout, "
                                         "bn-dropout, bn-scratch"):
        build_model("resnet")


def test_training_flops_per_image_are_the_matmuls_of_forward_and_backward():
    layers = [(784, 256), (256, 128), (128, 10)]
    forward = sum(2 * fan_in * fan_out for fan_in, fan_out in layers)
    weight_gradients = forward
    input_gradients = sum(2 * fan_in * fan_out for fan_in, fan_out in layers[1:])  # the image needs none
    assert forward + weight_gradients + input_gradients == 1_007_104
    assert training_flops_per_sample(build_model("plain")) == 1_007_104
    assert training_flops_per_sample(build_model("bn")) == 1_007_104  # BN's elementwise work is not counted


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-dropout"])
def test_init_scale_multiplies_every_linear_weight_of_the_default_init_and_nothing_else(variant):
    torch.manual_seed(3)
    default = build_model(variant)
    torch.manual_seed(3)
    scaled = build_model(variant, init_scale=10.0)
    for (name, ours), (_, theirs) in zip(scaled.state_dict().items(), default.state_dict().items(), strict=True):
        is_linear_weight = name.startswith("fc") and name.endswith("weight")
        assert torch.equal(ours, theirs * 10.0 if is_linear_weight else theirs), name


def test_dropout_variants_are_the_networks_with_dropout_after_each_hidden_relu():
    torch.manual_seed(0)
    with_dropout = build_model("bn-dropout")
    torch.manual_seed(0)
    without = build_model("bn")
    assert parameter_count(with_dropout) == parameter_count(without)  # dropout has no parameters: same init
    assert all(torch.equal(a, b) for a, b in zip(with_dropout.state_dict().values(), without.state_dict().values(),
                                                 strict=True))
    images = torch.randn(8, 1, 28, 28)
    with_dropout.eval()
    without.eval()
    assert torch.equal(with_dropout(images), without(images))  # eval mode: dropout is the identity
    with_dropout.train()
    assert not torch.equal(with_dropout(images), with_dropout(images))  # train mode: a fresh mask each call


def test_the_probe_reads_what_a_training_step_feeds_the_last_relu_and_changes_no_buffer():
    torch.manual_seed(0)
    images = torch.randn(32, 1, 28, 28)
    plain = build_model("plain")
    expected = plain.fc2(torch.relu(plain.fc1(images.view(32, -1))))
    assert torch.equal(probed_input(plain, images, variant("plain").probe), expected)
    for name in ("bn", "bn-scratch", "bn-dropout", "bn-ghost4", "ln", "plain-dropout"):
        model = build_model(name)
        point = variant(name).probe
        before = {key: buffer.clone() for key, buffer in model.named_buffers()}
        seen = {}
        model.get_submodule(point).register_forward_hook(
            lambda module, args, output, seen=seen: seen.update(out=output))
        model.train()
        if model.dropout is not None:
            model.dropout.p = 0.0
        model(images)
        for key, buffer in model.named_buffers():
            buffer.copy_(before[key])
        model.eval()
        torch.testing.assert_close(probed_input(model, images, point), seen["out"], rtol=1e-5, atol=1e-6)
        assert all(torch.equal(buffer, before[key]) for key, buffer in model.named_buffers())
        assert not model.training  # its mode restored


class NoisyRunningMean(nn.Module):
    """A user's BN-like layer: normalizes by the batch mean, keeps a running mean, and adds noise in training."""

    def __init__(self, features):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if not self.training:
            return x - self.running_mean
        with torch.no_grad():
            self.running_mean.lerp_(x.mean(0), 0.1)
            self.steps += 1
        return x - x.mean(0) + 0.01 * torch.randn_like(x)


class UserNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.norm, self.last = nn.Linear(784, 16), NoisyRunningMean(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.last(torch.relu(self.norm(self.first(x.flatten(1)))))


def test_probing_a_user_layer_changes_none_of_its_buffers_nor_torch_s_random_state():
    torch.manual_seed(0)
    model, images = UserNetwork(), torch.randn(16, 1, 28, 28)
    model.norm(torch.randn(4, 16))  # some running state to keep
    model.eval()
    before = {key: buffer.clone() for key, buffer in model.named_buffers()}
    state = torch.get_rng_state()
    probed = probed_input(model, images, "norm")
    assert probed.shape == (16, 16)
    assert probed.mean(0).abs().max() < 0.05  # centred on its batch's own mean: the training-mode output
    assert all(torch.equal(buffer, before[key]) for key, buffer in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), state)
    assert not model.training

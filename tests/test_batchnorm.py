import pytest
import torch
from torch import nn

from bnsuite.batchnorm import ScratchBatchNorm1d
from bnsuite.spec import RunSpec
from bnsuite.train import train


def _pair(features=16, seed=0):
    torch.manual_seed(seed)
    reference = nn.BatchNorm1d(features)
    scratch = ScratchBatchNorm1d(features)
    with torch.no_grad():  # non-trivial gamma and beta, equal in both
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
        scratch.weight.copy_(reference.weight)
        scratch.bias.copy_(reference.bias)
    return reference, scratch


def test_scratch_bn_matches_torch_outputs_and_gradients_in_training():
    reference, scratch = _pair()
    x = (torch.randn(32, 16) * 3 + 1).requires_grad_()
    x_copy = x.detach().clone().requires_grad_()
    upstream = torch.randn(32, 16)
    (reference(x) * upstream).sum().backward()
    out = scratch(x_copy)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, reference(x.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_copy.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scratch.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scratch.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-5)


def test_scratch_bn_running_statistics_match_torch_over_many_batches():
    reference, scratch = _pair()
    for step in range(20):
        x = torch.randn(8, 16) * (1 + step % 3) + step
        reference(x)
        scratch(x)
    torch.testing.assert_close(scratch.running_mean, reference.running_mean)
    torch.testing.assert_close(scratch.running_var, reference.running_var)  # unbiased, as torch
    assert scratch.num_batches_tracked.item() == reference.num_batches_tracked.item() == 20


def test_scratch_bn_matches_torch_in_eval_mode_with_running_statistics():
    reference, scratch = _pair()
    for _ in range(5):
        x = torch.randn(16, 16) * 2 - 1
        reference(x)
        scratch(x)
    reference.eval()
    scratch.eval()
    probe = torch.randn(3, 16)
    torch.testing.assert_close(scratch(probe), reference(probe), rtol=1e-5, atol=1e-6)
    before = scratch.running_mean.clone()
    scratch(probe)
    assert torch.equal(scratch.running_mean, before)  # eval never updates the estimates


def test_scratch_bn_refuses_a_single_sample_batch_in_training_like_torch():
    with pytest.raises(ValueError, match="more than 1 value"):
        ScratchBatchNorm1d(4)(torch.randn(1, 4))


def test_bn_scratch_variant_trains_on_the_same_trajectory_as_bn(mnist_dir):
    common = dict(epochs=2, train_subset=2_000, batch_size=64, seed=1)
    torch_bn = train(RunSpec(variant="bn", pipeline="eager", **common), data_dir=mnist_dir)
    scratch_bn = train(RunSpec(variant="bn-scratch", **common), data_dir=mnist_dir)
    for ours, theirs in zip(scratch_bn.epochs, torch_bn.epochs, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
        assert ours.validation_loss == pytest.approx(theirs.validation_loss, rel=1e-4)
    assert scratch_bn.test_accuracy == pytest.approx(torch_bn.test_accuracy, abs=0.05)

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnsuite.core.spec import RunSpec
from bnsuite.training.batchnorm import GhostBatchNorm1d, ScratchBatchNorm1d, ScratchGroupNorm
from bnsuite.training.train import train


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


def _ghost_pair(features=16, ghost=4, seed=0):
    torch.manual_seed(seed)
    ghost_bn = GhostBatchNorm1d(features, ghost)
    with torch.no_grad():
        ghost_bn.weight.uniform_(0.5, 1.5)
        ghost_bn.bias.uniform_(-0.5, 0.5)
    return ghost_bn


@pytest.mark.parametrize("size, groups", [(16, [4, 4, 4, 4]), (14, [4, 4, 4, 2]), (9, [4, 5]), (3, [3])])
def test_ghost_bn_normalizes_each_ghost_batch_as_torch_bn_normalizes_a_batch(size, groups):
    ghost_bn = _ghost_pair()
    x = (torch.randn(size, 16) * 3 + 1).requires_grad_()
    x_copy = x.detach().clone().requires_grad_()
    weight, bias = ghost_bn.weight.detach().clone().requires_grad_(), ghost_bn.bias.detach().clone().requires_grad_()
    # torch's own batch norm on each group on its own: what B/g devices compute without synchronized BN.
    reference = torch.cat([F.batch_norm(part, None, None, weight, bias, training=True)
                           for part in x.split(groups)])
    upstream = torch.randn(size, 16)
    (reference * upstream).sum().backward()
    out = ghost_bn(x_copy)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_copy.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ghost_bn.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ghost_bn.bias.grad, bias.grad, rtol=1e-4, atol=1e-5)


def test_ghost_bn_running_estimates_follow_the_first_ghost_batch_as_under_distributed_data_parallel():
    ghost_bn, rank_0 = _ghost_pair(), nn.BatchNorm1d(16)
    for step in range(20):
        x = torch.randn(16, 16) * (1 + step % 3) + step
        ghost_bn(x)
        rank_0(x[:4])  # the device that holds the first 4 images; DDP broadcasts its buffers to the others
    torch.testing.assert_close(ghost_bn.running_mean, rank_0.running_mean)
    torch.testing.assert_close(ghost_bn.running_var, rank_0.running_var)
    ghost_bn.eval()
    rank_0.eval()
    with torch.no_grad():
        rank_0.weight.copy_(ghost_bn.weight)
        rank_0.bias.copy_(ghost_bn.bias)
    probe = torch.randn(5, 16)
    torch.testing.assert_close(ghost_bn(probe), rank_0(probe), rtol=1e-5, atol=1e-6)


def test_ghost_bn_over_the_whole_batch_is_batch_norm_and_normalize_touches_no_buffer():
    ghost_bn, scratch = _ghost_pair(ghost=32), ScratchBatchNorm1d(16)
    with torch.no_grad():
        scratch.weight.copy_(ghost_bn.weight)
        scratch.bias.copy_(ghost_bn.bias)
    x = torch.randn(32, 16) * 2
    torch.testing.assert_close(ghost_bn.normalize(x), scratch(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(ghost_bn.running_mean, torch.zeros(16)) and ghost_bn.num_batches_tracked.item() == 0
    ghost_bn(x)
    torch.testing.assert_close(ghost_bn.running_var, scratch.running_var)


def test_ghost_bn_refuses_what_it_cannot_normalize():
    with pytest.raises(ValueError, match="more than 1 value"):
        GhostBatchNorm1d(4, 2)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="ghost size must be a whole number of at least 2"):
        GhostBatchNorm1d(4, 1)


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_scratch_group_norm_matches_torch_group_norm_and_with_one_group_layer_norm(groups):
    torch.manual_seed(groups)
    # In float64, so the check is of the formula: groups of 2 features cancel too much for float32's rounding.
    scratch = ScratchGroupNorm(groups, 16).double()
    references = [nn.GroupNorm(groups, 16).double()] + ([nn.LayerNorm(16).double()] if groups == 1 else [])
    with torch.no_grad():
        scratch.weight.uniform_(0.5, 1.5)
        scratch.bias.uniform_(-0.5, 0.5)
        for reference in references:
            reference.weight.copy_(scratch.weight)
            reference.bias.copy_(scratch.bias)
    upstream = torch.randn(8, 16, dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64) * 3 + 1
    x_scratch = x.clone().requires_grad_()
    out = scratch(x_scratch)
    (out * upstream).sum().backward()
    for reference in references:
        x_reference = x.clone().requires_grad_()
        expected = reference(x_reference)
        (expected * upstream).sum().backward()
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_scratch.grad, x_reference.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scratch.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scratch.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(out, scratch(x))  # no image's output depends on another image: no batch statistics


def test_an_image_s_layer_norm_output_does_not_depend_on_the_rest_of_the_batch():
    layer = ScratchGroupNorm(1, 16)
    x = torch.randn(8, 16)
    torch.testing.assert_close(layer(x)[:3], layer(x[:3]))


def _renorm_reference(x, gamma, beta, running_mean, running_var, ghost, r_max, d_max, eps, grad_out):
    """Batch Renormalization written directly from Ioffe (2017), Algorithm 1, one ghost batch and one feature at a
    time in float64, with its backward pass by hand (r and d constants): (output, dL/dx, dL/dgamma, dL/dbeta)."""
    n, c = x.shape
    out, grad_x = torch.zeros_like(x), torch.zeros_like(x)
    grad_gamma, grad_beta = torch.zeros(c, dtype=x.dtype), torch.zeros(c, dtype=x.dtype)
    for start in range(0, n, ghost):
        rows = slice(start, min(start + ghost, n))
        for j in range(c):
            v = x[rows, j]
            m = len(v)
            mean = v.sum() / m
            sigma_b = ((((v - mean) ** 2).sum() / m) + eps).sqrt()
            sigma = (running_var[j] + eps).sqrt()
            r = min(max(float(sigma_b / sigma), 1 / r_max), r_max)
            d = min(max(float((mean - running_mean[j]) / sigma), -d_max), d_max)
            x_hat = (v - mean) / sigma_b * r + d
            out[rows, j] = gamma[j] * x_hat + beta[j]
            g = grad_out[rows, j]
            grad_beta[j] += g.sum()
            grad_gamma[j] += (g * x_hat).sum()
            # y = gamma * (r * u + d), u = (v - mean) / sigma_b: BN's backward through u, scaled by r.
            u = (v - mean) / sigma_b
            gu = g * gamma[j] * r
            grad_x[rows, j] = (gu - gu.mean() - u * (gu * u).mean()) / sigma_b
    return out, grad_x, grad_gamma, grad_beta


@pytest.mark.parametrize("step", [0, 200, 10_000])  # in the warm-up (plain BN), on the ramp, at the final bounds
def test_batch_renorm_matches_a_direct_float64_reference_forward_and_backward(step):
    from bnsuite.training.batchnorm import BatchRenorm1d, renorm_bounds

    torch.manual_seed(0)
    layer = BatchRenorm1d(6, 4).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        # Running estimates far from the batches' own, so the clips bind for some features and not others.
        layer.running_mean.copy_(torch.linspace(-3, 3, 6, dtype=torch.float64))
        layer.running_var.copy_(torch.linspace(0.05, 20, 6, dtype=torch.float64))
        layer.num_batches_tracked.fill_(step)
    x = (torch.randn(16, 6, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    grad_out = torch.randn(16, 6, dtype=torch.float64)
    r_max, d_max = renorm_bounds(step)
    expected = _renorm_reference(x.detach(), layer.weight.detach(), layer.bias.detach(), layer.running_mean.clone(),
                                 layer.running_var.clone(), 4, r_max, d_max, layer.eps, grad_out)
    out = layer(x)
    out.backward(grad_out)
    for got, want in zip((out, x.grad, layer.weight.grad, layer.bias.grad), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)
    if step == 0:  # the warm-up is ghost-batch BN exactly
        ghost = GhostBatchNorm1d(6, 4).double()
        ghost.load_state_dict({k: v for k, v in layer.state_dict().items()})
        torch.testing.assert_close(out, ghost(x), rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == step + 1  # the schedule advances one step per training forward


def test_batch_renorm_bounds_warm_up_as_bn_then_ramp_to_their_final_values():
    from bnsuite.training.batchnorm import RENORM_D_MAX, RENORM_R_MAX, RENORM_RAMP, RENORM_WARMUP, renorm_bounds

    assert renorm_bounds(0) == renorm_bounds(RENORM_WARMUP) == (1.0, 0.0)
    middle = renorm_bounds(RENORM_WARMUP + RENORM_RAMP // 2)
    assert 1.0 < middle[0] < RENORM_R_MAX and 0.0 < middle[1] < RENORM_D_MAX
    assert renorm_bounds(RENORM_WARMUP + RENORM_RAMP) == renorm_bounds(10**6) == (RENORM_R_MAX, RENORM_D_MAX)


def test_noisy_bn_adds_fresh_unit_noise_in_training_only():
    from bnsuite.training.batchnorm import NoisyBatchNorm1d

    torch.manual_seed(0)
    layer, bn = NoisyBatchNorm1d(8), nn.BatchNorm1d(8)
    x = torch.randn(64, 8)
    clean = bn(x)
    first, second = layer(x), layer(x)
    # Per unit, each pass shifts and scales BN's output: the means move far more than per-image noise alone would.
    assert (first.mean(0) - clean.mean(0)).abs().max() > 0.1
    assert (first.mean(0) - second.mean(0)).abs().max() > 0.1  # drawn fresh at every step
    assert not torch.equal(first.std(0), second.std(0))
    layer.eval(), bn.eval()
    bn.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), bn(x))  # inference adds nothing

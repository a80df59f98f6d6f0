"""What training *should* cost: a roofline of the study's step, from analytic counts and measured rates.

Two terms bound a training step from below:

- **compute**: its matmul FLOPs (`training_flops_per_sample`, as torch counts them) at the
  machine's float32 matmul peak (`matmul_peak_flops`);
- **traffic**: the bytes it must move at the least (`StepTraffic`) at the
  copy bandwidth the machine reaches over a buffer as large as the step's
  working set (`copy_bandwidth`): a working set that stays in cache is
  streamed at cache speed, one that does not at memory speed.

The roofline bound is the larger of the two times; a step's *fraction of
the bound* is that time over the measured one, and its *fraction of matmul
peak* is its achieved FLOP/s over the peak. Both rates are measured on the
same machine in the same run, so the fractions hold whatever the machine's
speed or load.

What a step of these shapes can reach is measured too: its GEMMs alone
(`step_matmul_seconds`, at the rate the BLAS library reaches at the step's
small shapes rather than the peak's) and its SGD update alone
(`step_update_seconds`). Their sum is the step's *floor* as it is built (the
rest of the step, BN, ReLU, loss, being free); the bound over the floor is
the highest fraction of the bound the step could reach.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from bnsuite.core.datasets import DATASETS
from bnsuite.core.networks import DEFAULT_NETWORK
from bnsuite.training import fused
from bnsuite.training.fastpath import FastStep
from bnsuite.training.models import build_model, parameter_count

PEAK_MATRIX_SIZE = 2048  # large enough to run at the BLAS library's best rate on a CPU
FLOAT_BYTES = 4
MEMORY_BYTES = 256 * 2**20  # a copy this large runs at main-memory bandwidth on any CPU we know of


def training_flops_per_sample(model: nn.Module) -> int:
    """Matmul FLOPs of one sample's training step through the model: its forward and backward pass as torch
    counts them (torch.utils.flop_counter), every matrix product and convolution the step runs, whatever module
    or function runs it (a user's network with `torch.matmul` in its forward is counted as fully as a Linear).

    For a Linear: 2*in*out forward, 2*in*out for the weight gradient and 2*in*out for the input gradient except
    in the first layer, whose input (the image) needs none; a convolution likewise at each output position.
    BN, ReLU, loss and optimizer work is elementwise and not counted. Counted on a copy in eval mode, on one
    zero image of the model's `image_shape` (the products are a training step's; the model and torch's random
    state change in nothing).
    """
    probe = copy.deepcopy(model).eval()
    image = torch.zeros(1, *getattr(model, "image_shape", (1, 28, 28)))
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:  # the CPU generator only
        F.cross_entropy(probe(image), torch.zeros(1, dtype=torch.long)).backward()
    return counter.get_total_flops()


def activation_widths(model: nn.Module) -> tuple[int, int]:
    """(forward, backward) activation values per image of one training step of the study's networks.

    Forward: each Linear's output, the log-probabilities, and each BN layer's output (its input is the
    Linear's output, already counted). Backward: the gradient at the logits and at each Linear's input but
    the first's (the images need none), and each BN layer's input gradient. ReLU works in place of these.
    A network with neither Linear nor Conv2d modules (its products in torch.matmul, say) is measured instead:
    each leaf module's output on one image, and the logits, forward and backward (a lower bound: what is
    computed outside modules is not seen).
    """
    if any(isinstance(module, nn.Conv2d) for module in model.modules()):
        return _conv_activation_widths(model)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        return _measured_activation_widths(model)
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm1d)]
    outputs = sum(layer.out_features for layer in linears) + linears[-1].out_features  # + log-probabilities
    normalized = sum(layer.num_features for layer in norms)
    gradients = sum(layer.in_features for layer in linears[1:]) + linears[-1].out_features  # inputs of fc2, fc3
    return outputs + normalized, gradients + normalized


def _one_image_through(model: nn.Module, modules: list[nn.Module], hook) -> None:
    """One zero image of the model's `image_shape` through it in eval mode, `hook` on each of `modules`."""
    hooks = [module.register_forward_hook(hook) for module in modules]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *getattr(model, "image_shape", (1, 28, 28))))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()


def _measured_activation_widths(model: nn.Module) -> tuple[int, int]:
    """activation_widths of a network bnsuite cannot read: its leaf modules' outputs and its logits, measured."""
    values, logits = [], []
    leaves = [module for module in model.modules() if not any(module.children()) and module is not model]
    _one_image_through(model, leaves, lambda module, inputs, output: values.append(output[0].numel()))
    _one_image_through(model, [model], lambda module, inputs, output: logits.append(output[0].numel()))
    return sum(values) + 2 * logits[0], sum(values) + logits[0]


def _conv_activation_widths(model: nn.Module) -> tuple[int, int]:
    """The same for the ConvNet (bnsuite.models.SmallCNN), from one image's forward pass. Forward: each
    convolution's output, each normalization's output, each pooled map (a quarter of its block's), the logits
    and log-probabilities. Backward: the gradient at the logits, at the classifier's and conv2's inputs (the
    pooled maps), at each convolution's output (through pooling and ReLU) and at each normalization's input."""
    convs, norms = [], []

    def count(module: nn.Module, inputs, output) -> None:
        (convs if isinstance(module, nn.Conv2d) else norms).append(output[0].numel())

    _one_image_through(model, [module for module in model.modules() if isinstance(module, nn.Conv2d)
                               or isinstance(module, nn.GroupNorm) or type(module).__name__.endswith("Norm2d")],
                       count)
    pooled = sum(values // 4 for values in convs)
    logits = [module for module in model.modules() if isinstance(module, nn.Linear)][-1].out_features
    forward = sum(convs) + sum(norms) + pooled + 2 * logits
    backward = logits + pooled + sum(convs) + sum(norms)
    return forward, backward


@dataclass(frozen=True)
class StepTraffic:
    """The least a training step of `runs` models must move through memory, in bytes, and its working set.

    Per model and step, with P parameters (float32):
    - parameters, gradients and momentum buffers: each read once and written once by the step, the least any
      SGD-with-momentum step can do: 6 x 4P bytes (weights read by the forward and written by the update;
      gradients written by the backward and read by the update; momentum read and written by the update);
    - the batch's images: read once, 4 bytes a pixel (784 an MNIST image);
    - activations and their gradients (`activation_widths`): each written once and read once.
    The working set is everything one step touches: 3 x 4P bytes of parameter state plus the batch's share.
    """

    bytes_per_step: int
    working_set: int

    @classmethod
    def of(cls, variant: str, batch_size: int, runs: int, network: str = DEFAULT_NETWORK,
           image_shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10) -> StepTraffic:
        """The traffic of `runs` models of `variant` on `network`, for a dataset of `image_shape` and `classes`."""
        model = build_model(variant, network=network, image_shape=image_shape, classes=classes)
        parameters = parameter_count(model)
        forward, backward = activation_widths(model)
        batch = FLOAT_BYTES * batch_size * (math.prod(image_shape) + 2 * (forward + backward))
        return cls(bytes_per_step=runs * (6 * FLOAT_BYTES * parameters + batch),
                   working_set=runs * (3 * FLOAT_BYTES * parameters + batch))


def copy_bandwidth(nbytes: int, device: torch.device | str = "cpu", *, seconds: float = 0.3) -> float:
    """Measured bytes/s of copying a buffer of nbytes / 2 into another (read plus write: nbytes moved a copy).

    Best of repeated copies, so a buffer that fits in cache is measured at cache speed after the first.
    """
    device = torch.device(device)
    count = max(nbytes // (2 * FLOAT_BYTES), 1024)
    source = torch.randn(count, device=device)
    target = torch.empty_like(source)
    repeats = max(1, min(64, (64 * 2**20) // (count * FLOAT_BYTES)))  # time at least ~64 MB a sample
    return 2 * count * FLOAT_BYTES / _best_seconds(lambda: target.copy_(source), device, seconds, repeats)


@dataclass(frozen=True)
class Roofline:
    """A step's bound from its FLOPs and bytes at the measured matmul peak and bandwidth, and the fractions."""

    flops_per_step: float
    traffic: StepTraffic
    peak_flops: float  # float32 matmul FLOP/s
    bandwidth: float  # bytes/s over a buffer the size of the step's working set
    step_s: float  # measured
    matmul_s: float | None = None  # the step's matmuls alone, measured at its shapes (step_matmul_seconds)
    update_s: float | None = None  # the step's SGD update alone (step_update_seconds)

    @property
    def compute_s(self) -> float:
        return self.flops_per_step / self.peak_flops

    @property
    def traffic_s(self) -> float:
        return self.traffic.bytes_per_step / self.bandwidth

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.traffic_s)

    @property
    def limit(self) -> str:
        return "compute" if self.compute_s >= self.traffic_s else "traffic"

    @property
    def fraction_of_bound(self) -> float:
        return self.bound_s / self.step_s

    @property
    def fraction_of_peak(self) -> float:
        return self.compute_s / self.step_s

    @property
    def floor_s(self) -> float | None:
        """The step's GEMMs and its update, each timed alone: what the step costs with nothing else in it."""
        return None if self.matmul_s is None or self.update_s is None else self.matmul_s + self.update_s

    @property
    def ceiling(self) -> float | None:
        """The highest fraction of the bound a step with these GEMMs and this update can reach."""
        return None if self.floor_s is None else min(1.0, self.bound_s / self.floor_s)

    def info(self) -> dict:
        """The figures for a benchmark's extra_info (bnsuite.report reads them)."""
        return {"flops_per_step": self.flops_per_step, "bytes_per_step": self.traffic.bytes_per_step,
                "working_set_bytes": self.traffic.working_set, "bandwidth_gbps": self.bandwidth / 1e9,
                "compute_bound_s": self.compute_s, "traffic_bound_s": self.traffic_s, "limit": self.limit,
                "step_s": self.step_s, "fraction_of_roofline": self.fraction_of_bound, "matmul_s": self.matmul_s,
                "matmul_fraction_of_peak": None if self.matmul_s is None else self.compute_s / self.matmul_s,
                "update_s": self.update_s, "floor_s": self.floor_s, "fraction_of_roofline_ceiling": self.ceiling}


def step_floor_seconds(variant: str, batch_size: int, runs: int, device: torch.device | str = "cpu", *,
                       seconds: float = 0.3) -> tuple[float, float]:
    """(matmuls, update): measured seconds of a training step's matrix products alone and of its SGD update alone,
    as the step that trains here runs them: the fused step's (each model's products single-threaded, the models
    side by side on the threads; its update is the weights' pass after the momentum product) where it builds,
    else the ATen step's (`step_matmul_seconds`, `step_update_seconds`)."""
    model = build_model(variant).to(device)
    if not fused.supports(model, batch_size):
        return (step_matmul_seconds(model, batch_size, runs, device, seconds=seconds),
                step_update_seconds(variant, runs, device, seconds=seconds))
    images = torch.randn(batch_size, model.fc1.in_features)
    step = fused.FusedStep([build_model(variant) for _ in range(runs)], images, torch.zeros(batch_size,
                           dtype=torch.int64), lr=0.01, momentum=0.9, batch_size=batch_size,
                           dropout_generators=[torch.Generator() for _ in range(runs)])
    products = min(step.time_products(20, update=False) for _ in range(_repeats(seconds)))
    with_update = min(step.time_products(20, update=True) for _ in range(_repeats(seconds)))
    return products, max(with_update - products, 0.0)


def _repeats(seconds: float) -> int:
    return max(3, round(seconds * 20))


def step_matmul_seconds(model: nn.Module, batch_size: int, runs: int, device: torch.device | str = "cpu", *,
                        seconds: float = 0.3) -> float:
    """Measured seconds of a training step's matmuls alone, at the step's shapes, one GEMM per model and layer as
    the fast step calls them (bnsuite.fastpath): forward, weight gradient, and input gradient but the first
    layer's. The compute term at the rate these small shapes reach, rather than the peak's 2048-square one."""
    device = torch.device(device)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    calls = []
    for index, layer in enumerate(linears):
        for _ in range(runs):
            x, weight = torch.randn(batch_size, layer.in_features, device=device), layer.weight.detach().to(device)
            weight_t = weight.t()
            bias, out = layer.bias.detach().to(device), torch.empty(batch_size, layer.out_features, device=device)
            grad_weight, grad_input = torch.empty_like(weight), torch.empty_like(x)
            calls.append(lambda x=x, w=weight_t, b=bias, o=out: torch.addmm(b, x, w, out=o))
            calls.append(lambda x=x, o=out, g=grad_weight: torch.mm(o.t(), x, out=g))
            if index > 0:
                calls.append(lambda o=out, w=weight, g=grad_input: torch.mm(o, w, out=g))

    def step() -> None:
        for call in calls:
            call()

    return _best_seconds(step, device, seconds)


def step_update_seconds(variant: str, runs: int, device: torch.device | str = "cpu", *,
                        seconds: float = 0.3) -> float:
    """Measured seconds of the fast step's SGD-with-momentum update of `runs` models alone (FastStep.update:
    the fused update over each model's parameters, gradients and momentum buffers)."""
    device = torch.device(device)
    update = FastStep([build_model(variant).to(device) for _ in range(runs)], lr=0.01, momentum=0.9,
                      dropout_generators=[torch.Generator(device) for _ in range(runs)]).update
    return _best_seconds(update, device, seconds)


def _best_seconds(call, device: torch.device, seconds: float, repeats: int = 10) -> float:
    """The best time of `call` over samples of `repeats` calls, sampled for `seconds` after warm-up calls (thread
    pools, caches)."""
    for _ in range(3):
        call()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        _synchronize(device)
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def matmul_peak_flops(device: torch.device | str = "cpu", *, seconds: float = 1.0) -> float:
    """Measured float32 matmul FLOP/s of `device` on square matrices (best of repeated timings)."""
    device = torch.device(device)
    a = torch.randn(PEAK_MATRIX_SIZE, PEAK_MATRIX_SIZE, device=device)
    b = torch.randn(PEAK_MATRIX_SIZE, PEAK_MATRIX_SIZE, device=device)
    return 2 * PEAK_MATRIX_SIZE**3 / _best_seconds(lambda: a @ b, device, seconds, repeats=4)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StudyFloor:
    """The whole study against its floor: the least its training could take on this machine, and what it took.

    Each run's floor is its step roofline summed over the samples it trained: its matmul FLOPs at the measured
    peak, or its least traffic at the bandwidth measured over its step's working set, whichever is larger (as
    `Roofline.bound_s`, for the group it trained in). The study's floor sums the runs'. Training time sums the
    records' `train_time_s` (each run's share of its group's training, evaluation excluded); wall time is the
    session's, from the plugin's start to the benchmark JSON being written: start-up, data, evaluation, probes
    and the speed benchmark's rounds included. `ratio` figures are time over floor: 1 is the floor itself.
    """

    runs: int
    run_epochs: int
    gflop: float  # the runs' training matmul FLOPs, in GFLOP
    peak_gflops: float
    compute_s: float  # FLOPs at the peak, summed over runs
    traffic_s: float  # least bytes at the working set's bandwidth, summed over runs
    floor_s: float  # per run the larger of the two, summed
    train_time_s: float
    wall_time_s: float | None

    @property
    def train_ratio(self) -> float:
        return self.train_time_s / self.floor_s

    @property
    def wall_ratio(self) -> float | None:
        return None if self.wall_time_s is None else self.wall_time_s / self.floor_s

    @classmethod
    def of(cls, records, *, peak_flops: float, wall_time_s: float | None = None,
           bandwidth=None) -> StudyFloor:
        """The floor of `records` (bnsuite.records.RunRecord) at `peak_flops`; `bandwidth(nbytes)` gives bytes/s
        over a working set of nbytes (default: `copy_bandwidth`, measured once per power-of-two size)."""
        measured: dict[int, float] = {}

        def rate(nbytes: int) -> float:
            size = 1 << max(nbytes - 1, 1).bit_length()  # one measurement per power of two covers many groups
            if size not in measured:
                measured[size] = (bandwidth or copy_bandwidth)(size)
            return measured[size]

        per_sample: dict[tuple[str, str, str], int] = {}  # one count per network, variant and dataset

        def flops_per_sample(spec) -> int:
            key = (spec.variant, spec.network, spec.dataset)
            if key not in per_sample:
                info = DATASETS[spec.dataset]
                per_sample[key] = training_flops_per_sample(build_model(
                    spec.variant, network=spec.network, image_shape=info.image_shape, classes=info.classes))
            return per_sample[key]

        gflop = compute = traffic = floor = train = 0.0
        run_epochs = 0
        for record in records:
            spec = record.spec
            epochs = record.steps / spec.steps_per_epoch
            run_epochs += round(epochs)
            flops = flops_per_sample(spec) * spec.train_size * epochs
            info = DATASETS[spec.dataset]
            group = StepTraffic.of(spec.variant, spec.batch_size, record.runs_trained_together, spec.network,
                                   info.image_shape, info.classes)
            run_compute = flops / peak_flops
            run_traffic = record.steps * group.bytes_per_step / record.runs_trained_together / rate(group.working_set)
            gflop += flops / 1e9
            compute += run_compute
            traffic += run_traffic
            floor += max(run_compute, run_traffic)
            train += record.train_time_s
        return cls(runs=len(records), run_epochs=run_epochs, gflop=gflop, peak_gflops=peak_flops / 1e9,
                   compute_s=compute, traffic_s=traffic, floor_s=floor, train_time_s=train, wall_time_s=wall_time_s)

    def info(self) -> dict:
        """The figures for the benchmark JSON, under "bnsuite" -> "study_floor" (bnsuite.report reads them)."""
        return {"runs": self.runs, "run_epochs": self.run_epochs, "gflop": self.gflop, "peak_gflops": self.peak_gflops,
                "compute_s": self.compute_s, "traffic_s": self.traffic_s, "floor_s": self.floor_s,
                "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s, "train_ratio": self.train_ratio,
                "wall_ratio": self.wall_ratio}

    def describe(self) -> str:
        wall = "" if self.wall_time_s is None else f"; wall time {seconds(self.wall_time_s)} ({self.wall_ratio:.1f}x)"
        return (f"{self.runs} runs, {self.run_epochs} run-epochs, {self.gflop:,.0f} GFLOP: floor "
                f"{seconds(self.floor_s)} (compute {seconds(self.compute_s)} at {self.peak_gflops:.0f} GFLOP/s, "
                f"traffic {seconds(self.traffic_s)}); training {seconds(self.train_time_s)} ({self.train_ratio:.1f}x "
                f"the floor){wall}")


def seconds(value: float) -> str:
    """A time for a reader: whole seconds from 10 s up, two significant digits below (a smoke study's floor)."""
    return f"{value:.0f} s" if value >= 10 else f"{value:.2g} s"

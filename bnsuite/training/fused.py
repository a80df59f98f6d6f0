"""The fused training step: bnsuite/training/native/mlp.c, compiled on this machine, stepping S models a run of
batches at a time.

The ATen fast step (bnsuite.fastpath) still pays a Python call and a few
microseconds of dispatch for each of the few dozen kernels of a step, and
runs each small matrix product on both cores, where it fills neither. The
fused step runs a whole run of batches (up to the next probe or landscape
checkpoint) in one C call: each model's batches in order on one thread at a
time (a model cut between two threads where they do not divide the models),
its products single-threaded BLAS calls (torch's own sgemm) and
everything between them (bias, batch, ghost-batch or layer normalization,
Batch Renormalization's corrections, noisy BN's noise, ReLU before or after
the normalization or the sigmoid, dropout, the loss and its gradient, SGD with momentum) in
loops over the data with nothing allocated. Two models train side by side on
two cores. Dropout masks and noise are drawn in Python from each model's own
generator, as the modules draw them from torch's, so the fused step's runs
see the eager step's draws.

A model's arithmetic is all on its own thread, in an order that depends on
nothing but its own shapes, so a run trained in a group equals, bit for bit,
the run trained alone, on any number of threads (bnsuite.fastpath states the
same contract for the ATen step). The numbers are not the ATen step's bit
for bit (the normalization sums in another order, the momentum buffer takes
the gradient inside the product): they agree with autograd to float
rounding, tested like the ATen step.

It is built the first time a process needs it, with the C compiler in `$CC`
(else `cc`), `-O3 -march=native -fopenmp`, and cached per source, compiler,
flags and CPU under the user's cache directory (`$BNSUITE_BUILD_DIR` to
choose another). Where it cannot be had (no compiler, a torch whose BLAS is
not MKL, a GPU, or `BNSUITE_FUSED=0`) training falls back to the ATen fast
step and the record says which trained it (`RunRecord.training_step`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnsuite.core.files import user_cache_dir
from bnsuite.core.networks import BEFORE
from bnsuite.training import batchnorm
from bnsuite.training.batchnorm import BatchRenorm1d, GhostBatchNorm2d, NoisyBatchNorm1d
from bnsuite.training.environment import cpu_model_and_flags
from bnsuite.training.fastpath import BN_EPS, BN_MOMENTUM, normalization, per_model_settings, stack_into
from bnsuite.training.models import SimpleNNWithBN, SmallCNN, StackMLP, dropout_of

NATIVE = Path(__file__).parent / "native"
SOURCE = NATIVE / "bnsuite.c"  # one translation unit: common.h, mlp.c (the MLP family) and cnn.c (the ConvNet)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-tree-loop-distribute-patterns")
ABI_VERSION = 7  # bn_abi_version() of the C source: the Step and ConvStep layouts below match it
SWITCH_VARIABLE = "BNSUITE_FUSED"  # "0": train on the ATen fast step even where the fused one builds
BUILD_DIR_VARIABLE = "BNSUITE_BUILD_DIR"
COMPILE_TIMEOUT_S = 300
MAX_LAYERS = 24
MAX_GHOST_BATCHES = 1024  # the C source's bound on ghost batches per batch
# Steps per C call at most where a step draws random numbers: dropout masks and noisy BN's noise are drawn ahead (as
# F.dropout and NoisyBatchNorm1d draw them, step by step), so a run of batches holds its draws; without draws a call
# runs to the next checkpoint.
DROPOUT_CHUNK = 16
NORMALIZATIONS = {"none": 0, "bn": 1, "ghost": 1, "ln": 2}
NORM_NONE, NORM_BATCH, NORM_GROUP = 0, 1, 3  # the C source's codes (common.h)
MOVING_ESTIMATES = 2  # bn_evaluate's batch statistics with the running estimates moving, as Batch Renorm's do
CNN_LAYERS = 2


class Unavailable(RuntimeError):
    """The fused step cannot be built or loaded here; the message says why and what trains instead."""


PRECISIONS = {torch.float32: ("float32", (), "sgemm_", ctypes.c_float),
              torch.float64: ("float64", ("-DBN_DOUBLE",), "dgemm_", ctypes.c_double)}


@dataclass(frozen=True)
class Build:
    """The loaded library and what built it, as a record names it."""

    library: ctypes.CDLL
    compiler: str  # the first line of `$CC --version`
    dtype: torch.dtype

    @property
    def step_name(self) -> str:
        return f"fused ({self.compiler})"


def build(dtype: torch.dtype = torch.float32) -> Build:
    """The fused step's library for `dtype` (float32 trains; float64 is the tests' check of the arithmetic),
    compiled once per source, compiler and CPU, and loaded; Unavailable if it cannot be. The outcome, failure
    included, is kept for the process (`build.cache_clear()` forgets it)."""
    if dtype not in _BUILDS:
        try:
            _BUILDS[dtype] = _build(dtype)
        except Unavailable as error:
            _BUILDS[dtype] = error
    outcome = _BUILDS[dtype]
    if isinstance(outcome, Unavailable):
        raise outcome
    return outcome


_BUILDS: dict[torch.dtype, Build | Unavailable] = {}
build.cache_clear = _BUILDS.clear  # as functools.cache names it


def _build(dtype: torch.dtype) -> Build:
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        raise Unavailable(f"switched off by {SWITCH_VARIABLE}=0")
    if not torch.backends.mkl.is_available():
        raise Unavailable("this torch's BLAS is not MKL, whose sgemm the fused step calls")
    compiler = os.environ.get("CC") or "cc"
    path = shutil.which(compiler)
    if path is None:
        raise Unavailable(f"no C compiler ({compiler!r} is not on PATH; set CC or install gcc)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True)
        compiler_line = (version.stdout.strip().splitlines() or [compiler])[0]
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(f"the C compiler {compiler!r} does not run ({error})") from None
    precision, defines, gemm_symbol, _ = PRECISIONS[dtype]
    flags = (*FLAGS, *defines)
    source = b"\0".join(path.read_bytes() for path in sorted(NATIVE.glob("*.[ch]")))
    key = hashlib.sha256(b"\0".join([source, compiler_line.encode(), " ".join(flags).encode(),
                                     repr(cpu_model_and_flags()).encode()])).hexdigest()[:16]
    directory = Path(os.environ.get(BUILD_DIR_VARIABLE) or user_cache_dir() / "native")
    target = directory / f"mlp-{precision}-{key}.so"
    if not target.exists():
        _compile(path, compiler, flags, target)
    library = _load(target)
    if library is None:  # a damaged build in the cache: made again, once
        target.unlink(missing_ok=True)
        _compile(path, compiler, flags, target)
        library = _load(target)
    if library is None:
        raise Unavailable(f"{target} was built but does not load; delete {directory}")
    try:
        blas = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        gemm, threads = getattr(blas, gemm_symbol), blas.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        raise Unavailable(f"torch's library does not export MKL's {gemm_symbol} and thread switch here") from None
    library.bn_set_blas(ctypes.cast(gemm, ctypes.c_void_p), ctypes.cast(threads, ctypes.c_void_p))
    library.bn_train_steps.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    library.bn_train_steps.restype = None
    library.bn_evaluate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                    ctypes.c_void_p, ctypes.c_void_p]
    library.bn_evaluate.restype = None
    library.bn_precise.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p]
    library.bn_precise.restype = None
    library.bn_time_products.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    library.bn_time_products.restype = None
    library.bn_cnn_train_steps.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    library.bn_cnn_train_steps.restype = None
    library.bn_cnn_evaluate.argtypes = library.bn_evaluate.argtypes
    library.bn_cnn_evaluate.restype = None
    library.bn_cnn_workspace.argtypes = [ctypes.c_void_p]
    library.bn_cnn_workspace.restype = ctypes.c_int64
    return Build(library, compiler_line, dtype)


def _load(target: Path) -> ctypes.CDLL | None:
    """The library at `target`, if it loads and is of this source's ABI; None if not."""
    try:
        library = ctypes.CDLL(str(target))
        return library if library.bn_abi_version() == ABI_VERSION else None
    except (OSError, AttributeError):
        return None


def _compile(compiler_path: str, compiler: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile the source into `target`, through a temporary file renamed into place (builds in parallel
    processes do not collide)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        os.close(descriptor)
    except OSError as error:
        raise Unavailable(f"cannot write the build to {target.parent} ({error.strerror or error}); set "
                          f"{BUILD_DIR_VARIABLE} to a writable directory") from None
    try:
        result = subprocess.run([compiler_path, *flags, str(SOURCE), "-o", partial, "-lm"], capture_output=True,
                                text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise Unavailable(f"{compiler} could not build {SOURCE.name}: {last}")
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(f"{compiler} could not build {SOURCE.name} ({error})") from None
    finally:
        Path(partial).unlink(missing_ok=True)


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Train on the ATen fast step for the duration (the speed benchmark's side-by-side path, the fallback's tests),
    as `BNSUITE_FUSED=0` does for a whole process."""
    before = os.environ.get(SWITCH_VARIABLE)
    os.environ[SWITCH_VARIABLE] = "0"
    build.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ[SWITCH_VARIABLE]
        else:
            os.environ[SWITCH_VARIABLE] = before
        build.cache_clear()


def status() -> str:
    """What the fast pipeline trains with on a CPU here, in one line (the study's header prints it)."""
    try:
        return f"training step: {build().step_name}, each model on one thread"
    except Unavailable as error:
        return f"training step: the ATen fast step (the fused one is unavailable: {error}); the ConvNet's: eager"


def supports(model: nn.Module, batch_size: int) -> bool:
    """Whether a fused step trains `model` at `batch_size`: the MLP family as `mlp_layout` reads it, or the
    ConvNet (`conv_normalization`), on a CPU, where the library builds."""
    layout = mlp_layout(model)
    conv = conv_normalization(model)
    parameter = next(model.parameters())
    if (layout is None and conv is None) or parameter.device.type != "cpu" or parameter.dtype not in PRECISIONS:
        return False
    ghost = layout.ghost if layout is not None else getattr(model.bn1, "ghost_size", None)
    if ghost is not None and -(-batch_size // ghost) > MAX_GHOST_BATCHES:
        return False
    try:
        build(parameter.dtype)
    except Unavailable:
        return False
    return True


@dataclass(frozen=True)
class MlpLayout:
    """How the fused MLP step trains a model of the study's MLP family or Ioffe & Szegedy's network: its
    normalization as the ATen step names it ("none", "bn", "ghost", "ln"; bnsuite.fastpath.normalization), images
    per statistic for ghost batches, and what only the fused step covers: Batch Renormalization's corrections,
    noisy BN's noise, BN after the ReLU, the sigmoid."""

    norm: str
    ghost: int | None = None
    renorm: bool = False
    noisy: bool = False
    after_relu: bool = False
    sigmoid: bool = False  # the hidden layers' nonlinearity (IoffeMLP's), else ReLU
    norm_momentum: float = BN_MOMENTUM  # torch's momentum of the running estimates (StackMLP's may differ)


def takes_recipe(model: nn.Module, spec) -> bool:
    """Whether the fused step trains `model` with `spec`'s recipe: SGD at a constant rate without decay on every
    network it covers, and on the MLP family SGD with weight decay and a learning-rate schedule as well."""
    return spec.constant_sgd or (spec.optimizer == "sgd" and mlp_layout(model) is not None)


def mlp_layout(model: nn.Module) -> MlpLayout | None:
    """The fused step's reading of `model` (MlpLayout), or None where it does not cover it. Judged by the modules'
    types and settings (PyTorch's eps and momentum, both hidden layers alike), never by a variant's name."""
    norm = normalization(model)
    # What the ATen step covers, but the stacks (their nonlinearity) and BN's other momenta, read below.
    if norm is not None and not isinstance(model, StackMLP) and (
            norm != "bn" or getattr(model.bn1, "momentum", BN_MOMENTUM) == BN_MOMENTUM):
        return MlpLayout(norm, getattr(model.bn1, "ghost_size", None) if norm == "ghost" else None)
    if isinstance(model, StackMLP) and model.hidden < MAX_LAYERS:
        layers = [module for name, module in model.named_children() if name.startswith("bn")]
        if all(type(layer) is nn.Identity for layer in layers):
            return MlpLayout("none", sigmoid=model.sigmoid)
        momentum = _batch_norm_momentum(layers)
        return None if momentum is None else MlpLayout("bn", sigmoid=model.sigmoid, norm_momentum=momentum)
    # Dropout goes with nothing or torch's BatchNorm1d before the ReLU, read above: nothing else is held with it.
    if type(model) is not SimpleNNWithBN or dropout_of(model):
        return None
    after_relu = model.placement != BEFORE
    layers = (model.bn1, model.bn2)
    kinds = {type(layer) for layer in layers}
    momentum = _batch_norm_momentum(layers)
    if not after_relu and momentum is not None:  # running estimates of another momentum (bn-ema0.99)
        return MlpLayout("bn", norm_momentum=momentum)
    # A user's normalization in the MLP's slots has neither eps nor momentum, perhaps: its type decides first.
    if len(kinds) != 1 or kinds.isdisjoint({nn.BatchNorm1d, BatchRenorm1d, NoisyBatchNorm1d}) or not all(
            layer.eps == BN_EPS and layer.momentum == BN_MOMENTUM for layer in layers):
        return None
    (kind,) = kinds
    if after_relu:
        return MlpLayout("bn", after_relu=True) if kind is nn.BatchNorm1d else None
    if kind is BatchRenorm1d and len({layer.ghost_size for layer in layers}) == 1:
        return MlpLayout("ghost", layers[0].ghost_size, renorm=True)
    if kind is NoisyBatchNorm1d and all(layer.affine and layer.track_running_stats for layer in layers):
        return MlpLayout("bn", noisy=True)
    return None


def _batch_norm_momentum(layers) -> float | None:
    """The momentum of `layers` when every one is torch's BatchNorm1d at its eps, affine, tracking running estimates
    at one momentum (not None: a cumulative average the C step does not keep); else None."""
    momenta = {layer.momentum for layer in layers if type(layer) is nn.BatchNorm1d}
    if len(momenta) != 1 or None in momenta or not all(
            type(layer) is nn.BatchNorm1d and layer.eps == BN_EPS and layer.affine and layer.track_running_stats
            for layer in layers):
        return None
    return momenta.pop()


def conv_normalization(model: nn.Module) -> tuple[int, int] | None:
    """(the C source's normalization code, groups) with which the fused ConvNet step trains `model`, or None
    where it does not: the ConvNet (bnsuite.models.SmallCNN) with nothing, torch's BatchNorm2d, ghost-batch BN
    (GhostBatchNorm2d) or GroupNorm between each convolution and its ReLU, at their default eps and momentum,
    on images whose sides the two poolings halve exactly. Judged by the modules' types, never by a variant's
    name."""
    if type(model) is not SmallCNN or model.placement != BEFORE:
        return None
    _, height, width = model.image_shape
    layers = (model.bn1, model.bn2)
    if height % 4 or width % 4 or len({type(layer) for layer in layers}) != 1:
        return None
    first = layers[0]
    if type(first) is nn.Identity:
        return NORM_NONE, 1
    if type(first) in (nn.BatchNorm2d, GhostBatchNorm2d) and all(
            layer.eps == BN_EPS and layer.momentum == BN_MOMENTUM and getattr(layer, "affine", True)
            and getattr(layer, "track_running_stats", True)
            for layer in layers):
        return NORM_BATCH, 1
    if type(first) is nn.GroupNorm and all(layer.eps == BN_EPS and layer.affine for layer in layers):
        return NORM_GROUP, first.num_groups
    return None


_P = ctypes.c_void_p
_I64 = ctypes.c_int64


@functools.cache
def _step_type(real: type) -> type:
    """The C source's `Step`, field for field, with `real` (ctypes.c_float or c_double) for its scalars."""
    return type("Step", (ctypes.Structure,), {"_fields_": _fields(real)})


def _fields(real: type) -> list:
    return [
        ("models", ctypes.c_int), ("layers", ctypes.c_int), ("threads", ctypes.c_int), ("classes", ctypes.c_int),
        ("batch_size", ctypes.c_int), ("train_size", ctypes.c_int), ("first_step", ctypes.c_int),
        ("momentum", real), ("eps", real), ("norm_momentum", real), ("keep", real), ("weight_decay", real),
        ("widths", ctypes.c_int * (MAX_LAYERS + 1)), ("norm", ctypes.c_int * MAX_LAYERS),
        ("ghost", ctypes.c_int * MAX_LAYERS), ("after_relu", ctypes.c_int * MAX_LAYERS),
        ("renorm", ctypes.c_int * MAX_LAYERS), ("renorm_schedule", ctypes.c_double * 4), ("sigmoid", ctypes.c_int),
        ("lr", _P), ("images", _P), ("labels", _P), ("order", _P), ("order_stride", _I64),
        ("batch", _P), ("batch_stride", _I64), ("batch_labels", _P), ("batch_labels_stride", _I64),
        ("weight", _P * MAX_LAYERS), ("bias", _P * MAX_LAYERS),
        ("weight_momentum", _P * MAX_LAYERS), ("bias_momentum", _P * MAX_LAYERS),
        ("gamma", _P * MAX_LAYERS), ("beta", _P * MAX_LAYERS),
        ("gamma_momentum", _P * MAX_LAYERS), ("beta_momentum", _P * MAX_LAYERS),
        ("running_mean", _P * MAX_LAYERS), ("running_var", _P * MAX_LAYERS),
        ("batches_tracked", _P * MAX_LAYERS),
        ("masks", _P * MAX_LAYERS), ("masks_stride", _I64 * MAX_LAYERS), ("masks_step", _I64 * MAX_LAYERS),
        ("noise", _P * MAX_LAYERS), ("noise_stride", _I64 * MAX_LAYERS), ("noise_step", _I64 * MAX_LAYERS),
        ("normalized", _P * MAX_LAYERS), ("activation", _P * MAX_LAYERS), ("gradient", _P * MAX_LAYERS),
        ("relu_out", _P * MAX_LAYERS), ("correction", _P * MAX_LAYERS),
        ("activation_stride", _I64 * MAX_LAYERS),
        ("invstd", _P * MAX_LAYERS), ("invstd_stride", _I64 * MAX_LAYERS),
        ("logits", _P), ("logits_stride", _I64),
        ("scratch", _P), ("scratch_stride", _I64),
        ("losses", _P), ("losses_stride", _I64),
        ("correct", _P),
    ]


@functools.cache
def _conv_step_type(real: type) -> type:
    """The C source's `ConvStep` (cnn.c), field for field."""
    layers, with_fc = CNN_LAYERS, CNN_LAYERS + 1
    return type("ConvStep", (ctypes.Structure,), {"_fields_": [
        ("models", ctypes.c_int), ("threads", ctypes.c_int), ("classes", ctypes.c_int),
        ("batch_size", ctypes.c_int), ("train_size", ctypes.c_int), ("first_step", ctypes.c_int),
        ("momentum", real), ("eps", real), ("norm_momentum", real),
        ("channels", ctypes.c_int * (layers + 1)), ("height", ctypes.c_int), ("width", ctypes.c_int),
        ("norm", ctypes.c_int), ("ghost", ctypes.c_int), ("groups", ctypes.c_int),
        ("lr", _P), ("images", _P), ("labels", _P), ("order", _P), ("order_stride", _I64),
        ("weight", _P * with_fc), ("bias", _P * with_fc),
        ("weight_momentum", _P * with_fc), ("bias_momentum", _P * with_fc),
        ("gamma", _P * layers), ("beta", _P * layers), ("gamma_momentum", _P * layers), ("beta_momentum", _P * layers),
        ("running_mean", _P * layers), ("running_var", _P * layers), ("batches_tracked", _P * layers),
        ("workspace", _P), ("workspace_stride", _I64),
        ("losses", _P), ("losses_stride", _I64), ("correct", _P),
    ]})


def _blocks(models: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(models, size rounded up to a cache line) zeros: each model's block 64-byte aligned."""
    per_line = 64 // torch.empty((), dtype=dtype).element_size()
    return torch.zeros(models, -(-size // per_line) * per_line, dtype=dtype)


def fused_step(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, **settings) -> FusedStep:
    """The fused step that trains `models` (where `supports` says one does): the MLP family's or the ConvNet's."""
    if conv_normalization(models[0]) is not None:
        settings.pop("dropout_generators", None)  # no ConvNet variant drops out
        if settings.pop("weight_decay", 0.0):
            raise ValueError("the fused ConvNet step takes no weight decay (bnsuite.fused.takes_recipe)")
        return FusedConvStep(models, images, labels, **settings)
    return FusedStep(models, images, labels, **settings)


DRAW_SERIALLY = False  # every model's dropout masks on the calling thread, one model after another


@functools.cache
def _drawing_pool(threads: int) -> ThreadPoolExecutor:
    """The threads dropout masks are drawn on, model by model (one pool per thread count)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bnsuite-draws")


class FusedStep:
    """Trains S same-shaped models of the study's MLP family on an epoch's batches, a run of steps per call.

    As with the ATen step, the models keep working as modules: their parameters and running statistics become
    views into the stacked tensors the C code updates, so evaluating a model or reading its state needs no copy.
    """

    _TRAIN, _EVALUATE = "bn_train_steps", "bn_evaluate"  # the C source's entry points for this network

    def __init__(self, models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, *,
                 lr: float | Sequence[float], momentum: float, batch_size: int,
                 dropout_generators: Sequence[torch.Generator] | None = None, weight_decay: float = 0.0):
        """`images` (N, features) and `labels` (N,): the training set the epochs' orders index. `weight_decay`:
        torch's SGD weight decay of every parameter."""
        models = list(models)
        layouts = {mlp_layout(model) for model in models}
        if len(layouts) != 1 or None in layouts or len({type(model) for model in models}) != 1:
            raise ValueError("FusedStep trains one or more models of one class and layout (fused.mlp_layout)")
        (layout,) = layouts
        norm = layout.norm
        dtype = next(models[0].parameters()).dtype
        self.build = build(dtype)
        self.models = models
        self.layout = layout
        self.dropout, self.dropout_generators, lrs = per_model_settings("FusedStep", models, lr, dropout_generators)
        if layout.noisy and (dropout_generators is None or len(dropout_generators) != len(models)):
            raise ValueError("FusedStep needs one generator per model for noisy BN's noise (dropout_generators)")
        linears = [name for name, module in models[0].named_children() if isinstance(module, nn.Linear)]
        hidden = len(linears) - 1
        widths = [models[0].get_submodule(linears[0]).in_features] + [
            models[0].get_submodule(name).out_features for name in linears]
        count, rows = len(models), batch_size + 1  # + 1: a batch-statistics evaluation's last batch may hold one more
        if images.dtype != dtype or labels.dtype != torch.int64 or images.shape != (len(labels), widths[0]):
            raise ValueError(f"FusedStep trains on {dtype} images (N, {widths[0]}) and int64 labels (N,)")
        self.images, self.labels = images.contiguous(), labels.contiguous()
        train_size = len(labels)
        step = _step_type(PRECISIONS[dtype][3])(
            models=count, layers=len(linears), threads=torch.get_num_threads(), classes=widths[-1],
            batch_size=batch_size, train_size=train_size, first_step=1, momentum=momentum, eps=BN_EPS,
            norm_momentum=layout.norm_momentum, keep=1.0 - self.dropout, sigmoid=layout.sigmoid,
            weight_decay=weight_decay)
        step.renorm_schedule[:] = (batchnorm.RENORM_WARMUP, batchnorm.RENORM_RAMP, batchnorm.RENORM_R_MAX,
                                   batchnorm.RENORM_D_MAX)
        keep: list[torch.Tensor] = []  # every tensor the C code points into, alive as long as the step

        def pointer(tensor: torch.Tensor) -> int:
            keep.append(tensor)
            return tensor.data_ptr()

        for index, width in enumerate(widths):
            step.widths[index] = width
        self.lrs = torch.tensor(lrs, dtype=dtype)
        step.lr = pointer(self.lrs)
        step.images, step.labels = pointer(self.images), pointer(self.labels)
        batch = _blocks(count, rows * widths[0], dtype)
        step.batch, step.batch_stride = pointer(batch), batch.shape[1]
        batch_labels = torch.empty(count, rows, dtype=torch.int64)
        step.batch_labels, step.batch_labels_stride = pointer(batch_labels), rows
        for layer, name in enumerate(linears):
            for field, tensor_name in (("weight", f"{name}.weight"), ("bias", f"{name}.bias")):
                stacked = stack_into(models, tensor_name)
                getattr(step, field)[layer] = pointer(stacked)
                getattr(step, f"{field}_momentum")[layer] = pointer(torch.zeros_like(stacked))
        widest = max(widths)
        self._estimates: dict[int, tuple[torch.Tensor, ...]] = {}  # per normalized layer: its stacked estimates
        for layer in range(hidden):
            features = widths[layer + 1]
            norm_name = f"bn{layer + 1}"
            step.norm[layer] = NORMALIZATIONS[norm]
            step.ghost[layer] = layout.ghost or batch_size
            step.after_relu[layer], step.renorm[layer] = layout.after_relu, layout.renorm
            if norm != "none":
                for field, tensor_name in (("gamma", f"{norm_name}.weight"), ("beta", f"{norm_name}.bias")):
                    stacked = stack_into(models, tensor_name)
                    getattr(step, field)[layer] = pointer(stacked)
                    getattr(step, f"{field}_momentum")[layer] = pointer(torch.zeros_like(stacked))
            if norm in ("bn", "ghost"):
                self._estimates[layer] = tuple(stack_into(models, f"{norm_name}.{name}")
                                               for name in ("running_mean", "running_var", "num_batches_tracked"))
                step.running_mean[layer], step.running_var[layer], step.batches_tracked[layer] = (
                    pointer(tensor) for tensor in self._estimates[layer])
            for field in ("normalized", "activation", "gradient", "invstd") + (
                    ("relu_out",) if layout.after_relu else ()) + (("correction",) if layout.renorm else ()):
                # correction: r and d of each ghost batch, at most rows / 2 of them (ghost batches of 2 or more)
                blocks = _blocks(count, rows * features, dtype)
                getattr(step, field)[layer] = pointer(blocks)
            step.activation_stride[layer] = step.invstd_stride[layer] = blocks.shape[1]
        logits = _blocks(count, rows * widths[-1], dtype)
        step.logits, step.logits_stride = pointer(logits), logits.shape[1]
        scratch = _blocks(count, 8 * widest, dtype)
        step.scratch, step.scratch_stride = pointer(scratch), scratch.shape[1]
        self.chunk = DROPOUT_CHUNK if self.dropout or layout.noisy else None
        self.noise: list[torch.Tensor] = []
        if layout.noisy:
            for layer in range(hidden):
                features = widths[layer + 1]
                noise = torch.empty(count, DROPOUT_CHUNK, (2 + batch_size) * features, dtype=dtype)
                self.noise.append(noise)
                step.noise[layer], step.noise_stride[layer] = pointer(noise), noise.stride(0)
                step.noise_step[layer] = noise.stride(1)
        self.masks: list[torch.Tensor] = []
        if self.dropout:
            for layer in range(hidden):
                masks = torch.empty(count, DROPOUT_CHUNK, batch_size * widths[layer + 1], dtype=dtype)
                self.masks.append(masks)
                step.masks[layer], step.masks_stride[layer] = pointer(masks), masks.stride(0)
                step.masks_step[layer] = masks.stride(1)
            # Each model's mask blocks, step by step and layer by layer, made once: drawing indexes nothing.
            self._mask_views = [[[masks[index, k] for masks in self.masks] for k in range(DROPOUT_CHUNK)]
                                for index in range(count)]
        self._step, self._keep = step, keep
        self.step_name = self.build.step_name

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Each model's learning rate from the next step on (a schedule's, epoch by epoch)."""
        self.lrs.copy_(torch.tensor(lrs, dtype=self.lrs.dtype))

    def train(self, orders: torch.Tensor, first: int, steps: int, losses: torch.Tensor,
              correct: torch.Tensor) -> None:
        """Steps `first` to `first + steps - 1` of the epoch whose order of the training set is `orders` (S, N)
        (bnsuite.epochs.epoch_order per model); each step's loss is written to losses[:, step], hits are added to
        correct (S,)."""
        s = self._step
        if orders.dtype != torch.int64 or not orders.is_contiguous() or losses.dtype != self.build.dtype \
                or losses.stride(1) != 1 or correct.dtype != torch.int64 or not correct.is_contiguous():
            raise ValueError("FusedStep.train takes contiguous int64 orders and counts, and rows of losses")
        s.order, s.order_stride = orders.data_ptr(), orders.stride(0)
        s.losses, s.losses_stride = losses.data_ptr(), losses.stride(0)
        s.correct = correct.data_ptr()
        done = 0
        while done < steps:
            count = steps - done if self.chunk is None else min(self.chunk, steps - done)
            if self.dropout:
                self._draw_masks(first + done, count, s.batch_size, s.train_size)
            if self.noise:
                self._draw_noise(first + done, count, s.batch_size, s.train_size)
            getattr(self.build.library, self._TRAIN)(ctypes.byref(s), first + done, count)
            s.first_step = 0
            done += count

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, *,
                 batch_statistics: bool = False) -> list[tuple[float, float]] | None:
        """(mean cross-entropy, accuracy in percent) of every model on `images`, in eval mode, or with
        `batch_statistics` normalizing consecutive batches of the batch size by their own statistics as training
        does (bnsuite.train.evaluate_with_batch_statistics); nothing of the models changes. Batch Renorm's r and d
        read the running estimates, which its module moves from batch to batch in training mode: they move so here
        too, in copies. None for a batch-statistics evaluation of noisy BN (its noise is drawn from torch's
        generator): the modules evaluate it themselves."""
        if batch_statistics and self.layout is not None and self.layout.noisy:
            return None
        step, mode, copies = self._step, int(batch_statistics), []
        if batch_statistics and self.layout is not None and self.layout.renorm:
            step, mode = type(step).from_buffer_copy(step), MOVING_ESTIMATES
            for layer, estimates in self._estimates.items():
                copies.append([tensor.clone() for tensor in estimates])
                step.running_mean[layer], step.running_var[layer], step.batches_tracked[layer] = (
                    tensor.data_ptr() for tensor in copies[-1])
        count = len(labels)
        images = images.reshape(count, -1).to(self.build.dtype).contiguous()
        labels = labels.contiguous()
        losses = torch.zeros(len(self.models), dtype=torch.float64)
        hits = torch.zeros(len(self.models), dtype=torch.int64)
        getattr(self.build.library, self._EVALUATE)(ctypes.byref(step), images.data_ptr(), labels.data_ptr(),
                                                    count, mode, losses.data_ptr(), hits.data_ptr())
        return [(loss / count, 100.0 * hit / count) for loss, hit in zip(losses.tolist(), hits.tolist(), strict=True)]

    def precise(self, images: torch.Tensor, held_images: torch.Tensor, held_labels: torch.Tensor,
                ) -> tuple[list[float], list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """Precise BN (bnsuite.precise) of every model at once, in C: each batch-normalized layer's population mean
        and biased variance over `images` in consecutive batches of the batch size, each normalized by its own
        statistics as training normalizes it (computed by this step's own arithmetic, as training computed the
        running estimates), and every model's held-out accuracy (%) with them in place of its running estimates:
        (accuracies, per hidden layer (means, variances), each (S, F)). Nothing of the models changes. None where
        the models keep no running estimates, or for noisy BN and Batch Renorm (the module draws noise, or moves
        its estimates, batch by batch): the modules measure those themselves."""
        layout = self.layout
        if layout.norm not in ("bn", "ghost") or layout.noisy or layout.renorm:
            return None
        s, dtype, count = self._step, self.build.dtype, len(self.models)
        widths = list(s.widths[:s.layers + 1])
        hidden, widest = s.layers - 1, max(widths[1:-1])
        images = images.reshape(len(images), -1).to(dtype).contiguous()
        held_images = held_images.reshape(len(held_labels), -1).to(dtype).contiguous()
        held_labels = held_labels.contiguous()
        sums = torch.empty(count * hidden * 2 * widest, dtype=torch.float64)
        statistics = torch.zeros(hidden, 2, count, widest, dtype=dtype)
        hits = torch.zeros(count, dtype=torch.int64)
        self.build.library.bn_precise(ctypes.byref(s), images.data_ptr(), len(images), held_images.data_ptr(),
                                      held_labels.data_ptr(), len(held_labels), widest, sums.data_ptr(),
                                      statistics.data_ptr(), hits.data_ptr())
        layers = [tuple(statistics[layer, which].flatten()[:count * widths[layer + 1]].view(count, -1)
                        for which in (0, 1)) for layer in range(hidden)]
        return [100.0 * hit / len(held_labels) for hit in hits.tolist()], layers

    def time_products(self, steps: int, *, update: bool) -> float:
        """Seconds a step's matrix products (and with `update` the weights' SGD update) take alone, as `train` runs
        them (each model on one thread, full batches), over `steps` steps: the speed benchmark's floor of the step
        as built. It leaves nothing meaningful in the models: time it on models made for it."""
        started = time.perf_counter()
        self.build.library.bn_time_products(ctypes.byref(self._step), steps, int(update))
        return (time.perf_counter() - started) / steps

    def _each_model(self, draw) -> None:
        """`draw(index, generator)` for every model: on the step's threads at once where it has several. Each model
        draws from its own generator in its own order, so the draws are the same in any schedule. torch's Bernoulli
        kernel runs serially at about 11 ns an element and releases the GIL: drawing the masks one model at a time
        left every core but one idle for about a third of a dropout epoch (measured side by side on 2 cores of an
        Intel Xeon: 1.09x the epoch of bn-dropout at batch 64, 6 seeds). Noisy BN's draws are small calls whose
        Python overhead holds the GIL: threads made them slower (0.97x), so they stay serial."""
        models = list(enumerate(self.dropout_generators))
        if DRAW_SERIALLY or self._step.threads <= 1 or len(models) <= 1:
            for index, generator in models:
                draw(index, generator)
        else:
            list(_drawing_pool(self._step.threads).map(lambda model: draw(*model), models))

    def _draw_masks(self, first: int, count: int, batch: int, size: int) -> None:
        """Each model's dropout draws for `count` steps, in the order F.dropout makes them (step by step, layer by
        layer, Bernoulli(1 - p) from the model's own generator); the C code scales them by 1 / (1 - p)."""
        keep = 1 - self.dropout

        def draw(index: int, generator: torch.Generator) -> None:
            views = self._mask_views[index]
            for k in range(count):
                rows = min(batch, size - (first + k) * batch)
                for view in views[k]:
                    (view if rows == batch else view[:rows * (view.numel() // batch)]).bernoulli_(keep,
                                                                                                  generator=generator)

        self._each_model(draw)

    def _draw_noise(self, first: int, count: int, batch: int, size: int) -> None:
        """Each model's noise for `count` steps, as NoisyBatchNorm1d draws it from torch's generator in training
        (layer by layer: the scale's uniforms, the shift's, each image's normals), from the model's own generator
        where torch's stands after its init, then scaled as the module scales them."""
        low, high = batchnorm.NOISE_SCALE
        for index, generator in enumerate(self.dropout_generators):
            for k in range(count):
                rows = min(batch, size - (first + k) * batch)
                for noise in self.noise:
                    features = noise.shape[2] // (2 + batch)
                    block = noise[index, k]
                    block[:features].uniform_(generator=generator)
                    block[features:2 * features].uniform_(generator=generator)
                    block[2 * features:(2 + rows) * features].normal_(generator=generator)  # as randn_like, at once
        for noise in self.noise:  # scaled as the module scales them, the whole call's draws at once
            features = noise.shape[2] // (2 + batch)
            chunk = noise[:, :count]
            chunk[..., :features].mul_(high - low).add_(low)
            chunk[..., features:2 * features].mul_(2 * batchnorm.NOISE_SHIFT).sub_(batchnorm.NOISE_SHIFT)
            chunk[..., 2 * features:].mul_(batchnorm.NOISE_SAMPLE_STD)


class FusedConvStep(FusedStep):
    """Trains S same-shaped ConvNets (bnsuite.models.SmallCNN) on an epoch's batches, a run of steps per call
    (bnsuite/training/native/cnn.c), as FusedStep does the MLP family: the same `train` and `evaluate`, the models'
    tensors views into the stacked ones the C code updates. A convolution's weight is stacked channels-last, (Cout, 3,
    3, Cin) in memory, which is how each model's own weight lies (bnsuite.models.CHANNELS_LAST) and the order the C
    code's unfolded patches take."""

    _TRAIN, _EVALUATE = "bn_cnn_train_steps", "bn_cnn_evaluate"
    time_products = None  # the ConvNet's floor is its roofline (bnsuite.speed), not a timing of its products
    precise = None  # precise BN of a ConvNet: by the modules (bnsuite.precise)

    def __init__(self, models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, *,
                 lr: float | Sequence[float], momentum: float, batch_size: int):
        """`images` (N, C * H * W), each image channel-major as the dataset holds it, and `labels` (N,)."""
        models = list(models)
        kinds = {conv_normalization(model) for model in models}
        if len(kinds) != 1 or None in kinds or len({tuple(model.image_shape) for model in models}) != 1:
            raise ValueError("FusedConvStep trains one or more ConvNets of one normalization and image shape")
        ((norm, groups),) = kinds
        first = models[0]
        dtype = next(first.parameters()).dtype
        self.build = build(dtype)
        self.models = models
        self.dropout, self.dropout_generators, lrs = per_model_settings("FusedConvStep", models, lr, None)
        self.chunk, self.masks, self.noise, self.layout = None, [], [], None
        channels, height, width = first.image_shape
        convolutions = (first.conv1, first.conv2)
        if images.dtype != dtype or labels.dtype != torch.int64 or images.shape != (len(labels),
                                                                                    channels * height * width):
            raise ValueError(f"FusedConvStep trains on {dtype} images (N, {channels * height * width}) and int64 "
                             f"labels (N,)")
        self.images, self.labels = images.contiguous(), labels.contiguous()
        ghost = getattr(first.bn1, "ghost_size", None) or batch_size
        step = _conv_step_type(PRECISIONS[dtype][3])(
            models=len(models), threads=torch.get_num_threads(), classes=first.fc.out_features,
            batch_size=batch_size, train_size=len(labels), first_step=1, momentum=momentum,
            eps=first.bn1.eps if norm != NORM_NONE else BN_EPS, norm_momentum=BN_MOMENTUM, height=height,
            width=width, norm=norm, ghost=ghost, groups=groups)
        keep: list[torch.Tensor] = []

        def pointer(tensor: torch.Tensor) -> int:
            keep.append(tensor)
            return tensor.data_ptr()

        step.channels[0] = channels
        for layer, convolution in enumerate(convolutions):
            step.channels[layer + 1] = convolution.out_channels
        self.lrs = torch.tensor(lrs, dtype=dtype)
        step.lr = pointer(self.lrs)
        step.images, step.labels = pointer(self.images), pointer(self.labels)
        for layer, name in enumerate(("conv1", "conv2", "fc")):
            weight = _stack_channels_last(models, f"{name}.weight") if name != "fc" else stack_into(models,
                                                                                                   "fc.weight")
            bias = stack_into(models, f"{name}.bias")
            step.weight[layer], step.bias[layer] = pointer(weight), pointer(bias)
            step.weight_momentum[layer] = pointer(torch.zeros_like(weight))
            step.bias_momentum[layer] = pointer(torch.zeros_like(bias))
        for layer, name in enumerate(("bn1", "bn2")):
            if norm == NORM_NONE:
                continue
            for field, tensor_name in (("gamma", f"{name}.weight"), ("beta", f"{name}.bias")):
                stacked = stack_into(models, tensor_name)
                getattr(step, field)[layer] = pointer(stacked)
                getattr(step, f"{field}_momentum")[layer] = pointer(torch.zeros_like(stacked))
            if norm == NORM_BATCH:
                step.running_mean[layer] = pointer(stack_into(models, f"{name}.running_mean"))
                step.running_var[layer] = pointer(stack_into(models, f"{name}.running_var"))
                step.batches_tracked[layer] = pointer(stack_into(models, f"{name}.num_batches_tracked"))
        per_thread = self.build.library.bn_cnn_workspace(ctypes.byref(step))
        workspace = _blocks(step.threads, per_thread, dtype)
        step.workspace, step.workspace_stride = pointer(workspace), workspace.shape[1]
        self._step, self._keep = step, keep
        self.step_name = self.build.step_name


def _stack_channels_last(models: Sequence[nn.Module], name: str) -> torch.Tensor:
    """The models' convolution weights `name` stacked as (S, Cout, 3, 3, Cin), each model's own weight becoming
    a channels-last view of its slice (as stack_into makes views), so the model sees every in-place update."""
    stacked = torch.stack([model.get_parameter(name).detach().permute(0, 2, 3, 1) for model in models]).contiguous()
    for index, model in enumerate(models):
        model.get_parameter(name).data = stacked[index].permute(0, 3, 1, 2)
    return stacked

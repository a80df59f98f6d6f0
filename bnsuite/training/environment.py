"""What produced a record: the machine, the libraries and the code, as a bnsuite.records.Environment.

The exact numbers a run produces depend on which kernels ran: the CPU's
vector extensions and the instruction set ATen dispatches to, the BLAS
library and its version, torch, the thread count, the device. A record
carries all of them, so two records can be told apart as "same machine and
software, so bit for bit equal" or "another environment, so equal only up to
the rounding the kernels do differently".
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

from bnsuite.core.records import Environment

# The flags in /proc/cpuinfo that name vector extensions, the ones kernel choice depends on.
VECTOR_FLAG_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx")
GIT_COMMIT_VARIABLE = "BNSUITE_GIT_COMMIT"
KEEP_DENORMALS_VARIABLE = "BNSUITE_KEEP_DENORMALS"  # "1": compute with subnormals, as bnsuite did before


def flush_denormals() -> bool:
    """Have the CPU treat subnormal floats as zero (FTZ and DAZ) from now on; False where it cannot.

    Runs that collapse (plain at a high learning rate or a large init scale) fill their tensors with subnormal
    values, which x86 CPUs compute tens of times slower than normal ones. The mode is per thread, and a thread
    takes its creator's: set before torch starts its thread pool (bnsuite.train does it when imported), every
    intra-op thread has it; set later, only the calling thread does, and `denormal_mode` says "mixed"."""
    return torch.set_flush_denormal(True)


def denormal_mode(device: torch.device) -> str:
    """What the threads a computation runs on do with subnormal floats, measured: "flushed" (all of them flush),
    "kept" (none does) or "mixed". A matmul large enough to use every intra-op thread (BLAS's threads are the
    ones a late `flush_denormals` misses) and an elementwise product, of values whose products are subnormal."""
    if device.type != "cpu":
        return "kept"  # CUDA kernels keep subnormals unless built with flush-to-zero; torch's are not
    a = torch.full((512, 512), 1e-22)
    b = torch.full((512, 512), 1e-20)  # each product 1e-42, a sum of 512 of them 5e-40: subnormal either way
    products = torch.cat([(a @ b).flatten(), (torch.full((1 << 18,), 1e-40) * 1.0)])
    flushed = products.view(torch.int32) == 0  # the bits: a float comparison on a flushing thread says 0 anyway
    return "flushed" if bool(flushed.all()) else "kept" if not bool(flushed.any()) else "mixed"


def describe_environment(device: torch.device, dataset_checksum: str) -> Environment:
    cpu_model, cpu_flags = cpu_model_and_flags()
    return Environment(
        torch_version=torch.__version__,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model,
        cpu_model=cpu_model,
        cpu_flags=cpu_flags,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        blas=blas_library(),
        threads=torch.get_num_threads(),
        denormals=denormal_mode(device),
        python_version=platform.python_version(),
        platform=platform.platform(),
        git_commit=git_commit(),
        dataset_checksum=dataset_checksum,
        hostname=platform.node() or None,
    )


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and its vector-extension flags (Linux); elsewhere what `platform` says, no flags."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine(), ()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    vector_flags = sorted({flag for flag in (flags.group(1).split() if flags else ())
                           if flag.startswith(VECTOR_FLAG_PREFIXES)})
    return (model.group(1).strip() if model else platform.processor() or platform.machine()), tuple(vector_flags)


def blas_library() -> str:
    """The BLAS torch was built with, as its build configuration names it, with the MKL version if it is MKL."""
    config = torch.__config__.show()
    name = re.search(r"BLAS_INFO=(\w+)", config)
    version = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    text = name.group(1) if name else "unknown"
    return f"{text} {version.group(1)}" if version and text == "mkl" else text


def git_commit() -> str | None:
    """The commit of the bnsuite checkout, `+dirty` if its code has local changes; None outside git.

    Changes under `results/` do not count: a study writes its records there as
    it runs, and that says nothing about the code. A Ray worker runs a copy of
    the checkout without its git history: the driver passes its own answer in
    `BNSUITE_GIT_COMMIT` (bnsuite.executor).
    """
    if os.environ.get(GIT_COMMIT_VARIABLE):
        return os.environ[GIT_COMMIT_VARIABLE]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

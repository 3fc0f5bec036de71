"""The native CPU dequantization kernel: bit-identical output, argument checks, fallback and build cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch

from lightning_qlora._native_build import NativeBuildError
from lightning_qlora.quantization.backends import cpu_kernel
from lightning_qlora.quantization.backends.cpu_kernel import build_kernel, dequantize_4bit_into

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPO_ROOT = Path(__file__).resolve().parents[2]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 != +0.0 and NaN payloads count (torch.equal on floats would hide both)."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, cpu_kernel._Kernel]:
    """The build this machine gets, plus the portable C and (on x86) the AVX2 inner loops, built fresh."""
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler here: the kernel cannot be built (its fallback is tested below)")
    cache = tmp_path_factory.mktemp("kernel-cache")
    built = {"native": build_kernel(cache), "portable": build_kernel(cache, extra_flags=("-DLQ_NO_SIMD",))}
    if os.uname().machine in ("x86_64", "AMD64"):
        built["avx2"] = build_kernel(cache, extra_flags=("-march=haswell",))
        assert built["avx2"].simd_level == 1
    assert built["portable"].simd_level == 0
    return built


def run_variant(
    kernel: cpu_kernel._Kernel, packed: torch.Tensor, state: bnbf.QuantState, out: torch.Tensor
) -> None:
    """Call one build directly with the arguments `dequantize_4bit_into` would pass."""
    n = out.numel()
    if state.nested:
        nested = state.state2
        cpu_kernel._call(
            kernel,
            packed.view(-1),
            state.code,
            None,
            state.absmax,
            nested.code,
            nested.absmax,
            nested.blocksize,
            float(state.offset),
            state.blocksize,
            n,
            out,
            2,
        )
    else:
        cpu_kernel._call(
            kernel,
            packed.view(-1),
            state.code,
            state.absmax,
            None,
            None,
            None,
            1,
            0.0,
            state.blocksize,
            n,
            out,
            2,
        )


def public_call(
    packed: torch.Tensor, state: bnbf.QuantState, out: torch.Tensor, **kwargs: object
) -> torch.Tensor:
    nested = state.state2 if state.nested else None
    return dequantize_4bit_into(
        packed.view(-1),
        state.code,
        state.absmax,
        state.blocksize,
        out,
        nested_code=None if nested is None else nested.code,
        nested_absmax=None if nested is None else nested.absmax,
        nested_blocksize=256 if nested is None else nested.blocksize,
        offset=0.0 if nested is None else float(state.offset),
        **kwargs,  # type: ignore[arg-type]
    )


def reference(packed: torch.Tensor, state: bnbf.QuantState, n: int, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' arithmetic in plain torch, blocks over the flat index as quantize_4bit lays them out."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.view(-1)
    idx = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    return (state.code[idx] * scale).to(dtype)


def zero_sign_free(t: torch.Tensor, quant_type: str) -> torch.Tensor:
    """FP4 code 8 is a zero: bitsandbytes' scalar C loop writes it as -0.0, its other paths as +0.0."""
    return bits(t + 0.0) if quant_type == "fp4" else bits(t)


def test_kernel_builds_where_a_compiler_is() -> None:
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler here")
    assert cpu_kernel.kernel_available()
    info = cpu_kernel.kernel_info()
    assert info is not None
    assert Path(str(info["path"])).is_file()


def check_against_bitsandbytes(
    variants: dict[str, cpu_kernel._Kernel], weight: torch.Tensor, quant_type: str, double_quant: bool
) -> None:
    shape = weight.shape
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    for dtype in DTYPES:
        state.dtype = dtype
        expected = bnbf.dequantize_4bit(packed, state).reshape(shape)  # (1, n) comes back transposed
        assert torch.equal(
            zero_sign_free(reference(packed, state, weight.numel(), dtype).reshape(shape), quant_type),
            zero_sign_free(expected, quant_type),
        )
        out = torch.full(shape, float("nan"), dtype=dtype)
        assert public_call(packed, state, out) is out
        assert torch.equal(zero_sign_free(out, quant_type), zero_sign_free(expected, quant_type)), dtype
        for name, kernel in variants.items():
            out_v = torch.full(shape, float("nan"), dtype=dtype)
            run_variant(kernel, packed, state, out_v)
            assert torch.equal(bits(out_v), bits(out)), (name, dtype)


# bitsandbytes' public function takes the same flat layout on every machine for these shapes: odd ones
# go through its torch path, and its C kernels agree with it when the row length is a multiple of the
# block size or not a multiple of 16. Its torch path for odd shapes is torch.compile'd, and a compile
# per shape and dtype costs seconds: these run it eagerly (what bitsandbytes itself falls back to), and
# `test_odd_shape_against_compiled_bitsandbytes` checks the compiled path once.
@pytest.mark.parametrize("shape", [(256, 4096), (33, 65), (7, 3), (1, 1), (3, 66), (2, 4098), (1, 64)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "dq"])
def test_bit_identical_to_bitsandbytes(
    variants: dict[str, cpu_kernel._Kernel], shape: tuple[int, int], quant_type: str, double_quant: bool
) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 10007 + shape[1])
    weight = torch.randn(shape, generator=gen) * 0.05
    with torch._dynamo.config.patch(disable=True):
        check_against_bitsandbytes(variants, weight, quant_type, double_quant)


@pytest.mark.slow
def test_odd_shape_against_compiled_bitsandbytes(variants: dict[str, cpu_kernel._Kernel]) -> None:
    weight = torch.randn(33, 65, generator=torch.Generator().manual_seed(3))
    check_against_bitsandbytes(variants, weight, "nf4", True)


def test_llama_sized_weight(variants: dict[str, cpu_kernel._Kernel]) -> None:
    """A 4096x4096 NF4 + double-quant weight, as QLoRA stores it, in every output dtype."""
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(4)) * 0.02
    check_against_bitsandbytes({"native": variants["native"]}, weight, "nf4", True)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("shape", [(5, 80), (3, 96), (17, 130), (1, 4097)])
def test_flat_block_layout_for_every_blocksize(
    variants: dict[str, cpu_kernel._Kernel], blocksize: int, shape: tuple[int, int]
) -> None:
    """Rows that end inside a block, and the last partial block. Checked against the reference arithmetic:
    bitsandbytes' AVX-512 kernel indexes absmax per row here (0.50.2), unlike its own quantize_4bit."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize))
    for quant_type in ("nf4", "fp4"):
        packed, state = bnbf.quantize_4bit(
            weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
        )
        for dtype in DTYPES:
            expected = reference(packed, state, weight.numel(), dtype).reshape(shape)
            for name, kernel in variants.items():
                out = torch.empty(shape, dtype=dtype)
                run_variant(kernel, packed, state, out)
                assert torch.equal(bits(out), bits(expected)), (name, quant_type, dtype)
        # the flat layout is the one that reproduces the weight: errors stay within a 4-bit step
        out = torch.empty(shape)
        public_call(packed, state, out)
        assert (out - weight).abs().mean() < 0.15


def test_rounding_of_any_code_book(variants: dict[str, cpu_kernel._Kernel]) -> None:
    """Values across the whole exponent range (subnormal, overflowing, ±0) round exactly as torch rounds.

    (A NaN, which only a non-finite absmax can produce, may carry another payload than torch's.)"""
    gen = torch.Generator().manual_seed(7)
    n, blocksize = 4096 * 3 + 1, 64
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen)
    exponents = torch.randint(-140, 120, (16,), generator=gen).float()
    code = (torch.randn(16, generator=gen) * torch.exp2(exponents)).float()
    code[0], code[1] = 0.0, -0.0
    nblocks = -(-n // blocksize)
    absmax = torch.rand(nblocks, generator=gen) * torch.exp2(
        torch.randint(-20, 20, (nblocks,), generator=gen)
    )
    absmax[0] = 3e38  # products overflow to ±inf
    scale = absmax.repeat_interleave(blocksize)[:n]
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    for dtype in DTYPES:
        expected = (code[idx] * scale).to(dtype)
        for name, kernel in variants.items():
            out = torch.empty(n, dtype=dtype)
            cpu_kernel._call(kernel, packed, code, absmax, None, None, None, 1, 0.0, blocksize, n, out, 3)
            assert torch.equal(bits(out), bits(expected)), (name, dtype)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "dq"])
def test_threads_split_without_gaps(double_quant: bool) -> None:
    """Thread chunks start mid second-level block (nested blocks of 3) and end on a partial block."""
    gen = torch.Generator().manual_seed(5)
    n = 3 * 2**18 + 7  # several threads' worth, odd
    nblocks = -(-n // 64)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen)
    code = torch.randn(16, generator=gen)
    if double_quant:
        absmax = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=gen)
        nested = {
            "nested_code": torch.randn(256, generator=gen),
            "nested_absmax": torch.rand(-(-nblocks // 3)),
        }
        kwargs: dict[str, object] = {**nested, "nested_blocksize": 3, "offset": 0.25}
        scale = nested["nested_code"][absmax.long()] * nested["nested_absmax"].repeat_interleave(3)[:nblocks]
        scale = scale + torch.tensor(0.25)
    else:
        absmax = torch.rand(nblocks, generator=gen)
        kwargs = {}
        scale = absmax
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    expected = code[idx] * scale.repeat_interleave(64)[:n]
    for threads in (1, 2, 3, 5):
        out = torch.full((n,), float("nan"))
        dequantize_4bit_into(packed, code, absmax, 64, out, num_threads=threads, **kwargs)  # type: ignore[arg-type]
        assert torch.equal(bits(out), bits(expected)), threads


def test_concurrent_calls_from_threads() -> None:
    """ctypes releases the GIL: calls from several Python threads run at once and must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(6)
    jobs = []
    for size in (64 * 1001, 64 * 517 + 3, 2**19):
        packed = torch.randint(0, 256, ((size + 1) // 2,), dtype=torch.uint8, generator=gen)
        code, absmax = torch.randn(16, generator=gen), torch.rand(-(-size // 64), generator=gen)
        jobs.append((packed, code, absmax, size))
    expected = [
        dequantize_4bit_into(p, c, a, 64, torch.empty(n, dtype=torch.bfloat16)) for p, c, a, n in jobs
    ]

    def run(i: int) -> torch.Tensor:
        packed, code, absmax, size = jobs[i % len(jobs)]
        return dequantize_4bit_into(
            packed, code, absmax, 64, torch.empty(size, dtype=torch.bfloat16), num_threads=2
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(24)))
    for i, result in enumerate(results):
        assert torch.equal(bits(result), bits(expected[i % len(jobs)]))


def _valid_args() -> dict[str, object]:
    """A double-quantized 10x10 weight (100 values, 2 blocks of 64); each test breaks one argument."""
    return {
        "packed": torch.zeros(50, dtype=torch.uint8),
        "code": torch.zeros(16),
        "absmax": torch.zeros(2, dtype=torch.uint8),
        "blocksize": 64,
        "out": torch.empty(10, 10),
        "nested_code": torch.zeros(256),
        "nested_absmax": torch.zeros(1),
        "nested_blocksize": 256,
        "offset": 0.5,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"packed": torch.zeros(50, dtype=torch.int8)}, "packed must be torch.uint8"),
        ({"packed": torch.zeros(49, dtype=torch.uint8)}, "packed must have 50 elements"),
        ({"packed": torch.zeros(100, dtype=torch.uint8)[::2]}, "packed must be contiguous"),
        ({"code": torch.zeros(16, dtype=torch.float64)}, "code must be torch.float32"),
        ({"code": torch.zeros(256)}, "code must have 16 elements"),
        ({"absmax": torch.zeros(3, dtype=torch.uint8)}, "absmax must have 2 elements"),
        ({"absmax": torch.zeros(2)}, "absmax must be torch.uint8"),
        ({"nested_absmax": None}, "needs both nested_code and nested_absmax"),
        ({"nested_code": torch.zeros(255)}, "nested_code must have 256 elements"),
        ({"nested_absmax": torch.zeros(2)}, "nested_absmax must have 1 elements"),
        ({"nested_blocksize": 0}, "nested_blocksize must be a positive integer"),
        ({"nested_code": None, "nested_absmax": None}, "uint8 (double-quantized) absmax needs nested_code"),
        ({"blocksize": 63}, "blocksize must be a positive even integer"),
        ({"blocksize": 64.0}, "blocksize must be a positive even integer"),
        ({"out": torch.empty(10, 10, dtype=torch.float64)}, "out must be float32, bfloat16 or float16"),
        ({"out": torch.empty(10, 20)[:, :10]}, "out must be contiguous"),
        ({"out": torch.empty(10, 10, device="meta")}, "out must be on the CPU"),
        ({"offset": "0.5"}, "offset must be a float"),
        ({"num_threads": 0}, "num_threads must be a positive integer"),
    ],
)
def test_bad_arguments_are_refused_before_any_write(change: dict[str, object], message: str) -> None:
    args = _valid_args()
    args.update(change)
    out = args["out"]
    assert isinstance(out, torch.Tensor)
    if out.device.type == "cpu":
        out.fill_(3.0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dequantize_4bit_into(**args)  # type: ignore[arg-type]
    if out.device.type == "cpu":
        assert bool((out == 3.0).all())


def test_empty_output_is_fine() -> None:
    out = torch.empty(0, 5)
    assert (
        dequantize_4bit_into(torch.empty(0, dtype=torch.uint8), torch.zeros(16), torch.zeros(0), 64, out)
        is out
    )


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), cpu_kernel.__file__],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO_ROOT,
        timeout=300,
        check=False,
    )


# The module is loaded from its file: importing the package would import Lightning, seconds per process.
_PROBE = """
    import importlib.util, logging, sys
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
    spec = importlib.util.spec_from_file_location("cpu_kernel", sys.argv[1])
    cpu_kernel = sys.modules["cpu_kernel"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_kernel)
    print("available", cpu_kernel.kernel_available(), cpu_kernel.kernel_available())
    try:
        import torch
        cpu_kernel.dequantize_4bit_into(torch.zeros(1, dtype=torch.uint8), torch.zeros(16), torch.ones(1), 64,
                                        torch.empty(2))
    except RuntimeError as err:
        print("refused:", err)
"""


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"LIGHTNING_QLORA_CC": "/nonexistent/bin/cc"}, "cannot be run"),
        ({"LIGHTNING_QLORA_CC": "false"}, "--version failed"),
        ({"LIGHTNING_QLORA_DISABLE_KERNEL": "1"}, "disabled by LIGHTNING_QLORA_DISABLE_KERNEL"),
    ],
    ids=["missing-compiler", "failing-compiler", "disabled"],
)
def test_fallback_is_one_log_line_not_an_error(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    done = _run_python(_PROBE, {"XDG_CACHE_HOME": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    assert "available False False" in done.stdout
    assert "refused: dequantize_4bit_into: the native kernel is unavailable" in done.stdout
    lines = [line for line in done.stderr.splitlines() if "native CPU dequantization kernel" in line]
    assert len(lines) == 1, done.stderr
    assert reason in lines[0]
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "lightning_qlora" / "native").glob("*.so"))


def test_cache_is_reused_and_a_broken_file_is_rebuilt(tmp_path: Path) -> None:
    first = build_kernel(tmp_path / "a")
    built_at = first.path.stat().st_mtime_ns
    second = build_kernel(tmp_path / "a")
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == built_at  # loaded, not rebuilt
    # A truncated file under the final name (a crash mid-copy, a full disk) is not used: it is rebuilt.
    # (Another directory, because a process never reopens a path it has already loaded.)
    data = first.path.read_bytes()
    broken = tmp_path / "b" / first.path.name
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 3])
    third = build_kernel(tmp_path / "b")
    assert third.path == broken
    assert broken.read_bytes() == data
    broken.unlink()  # never rewrite a loaded library in place: its pages are mapped
    broken.write_bytes(b"not a library")
    assert build_kernel(tmp_path / "b").path.read_bytes() == data
    # the key covers the source, the compiler and the flags: another flag set is another file
    other = build_kernel(tmp_path / "a", extra_flags=("-DLQ_NO_SIMD",))
    assert other.path != first.path
    for folder in ("a", "b"):
        assert not list((tmp_path / folder).glob(".*.tmp"))  # no temp files left behind


def test_build_errors_name_the_compiler(tmp_path: Path) -> None:
    with pytest.raises(NativeBuildError, match="nonexistent"):
        build_kernel(tmp_path, cc=str(tmp_path / "nonexistent-cc"))


@pytest.mark.slow
def test_two_processes_building_at_once(tmp_path: Path) -> None:
    """DDP ranks start together on an empty cache: both must load a complete library."""
    code = """
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("cpu_kernel", sys.argv[1])
        cpu_kernel = sys.modules["cpu_kernel"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cpu_kernel)
        assert cpu_kernel.kernel_available()
        print("ok")
    """
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), cpu_kernel.__file__],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.strip() == "ok"
    assert len(list((tmp_path / "lightning_qlora" / "native").glob("*.so"))) == 1
    assert not list((tmp_path / "lightning_qlora" / "native").glob(".*.tmp"))

"""The CPU caching allocator is a guest: in place while a fit/validate/test/predict or a load runs, the
previous allocator back afterwards, and never over another malloc. Each test runs in a fresh interpreter
(the allocator is process-wide) on a real Trainer, `load_quantized` and files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_qlora.quantization import cpu_caching_allocator

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_compiler = pytest.mark.skipif(
    cpu_caching_allocator.compiler() is None,
    reason="no C++ compiler here: the allocator cannot be built (its fallback is tested elsewhere)",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One build for this module, outside the user's cache."""
    return str(tmp_path_factory.mktemp("guest-cache"))


def run(cache: str, code: str, env: dict[str, str] | None = None) -> tuple[dict[str, object], str]:
    full_env = {**os.environ, "LIGHTNING_QLORA_CACHE": cache, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join((str(REPO_ROOT), str(REPO_ROOT / "tests")))
    command = [sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=full_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


STAGES = """
    import json, torch
    import lightning.pytorch as pl
    from lightning_qlora import QLoRAPrecision
    from lightning_qlora.quantization import cpu_caching_allocator as alloc
    from tiny_models import TinyClassifier, toy_loader

    class Module(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            return self.training_step(batch, batch_idx)
        test_step = validation_step
        def predict_step(self, batch, batch_idx):
            return self(batch[0])

    seen, kept = {}, []

    class Probe(pl.Callback):
        def __init__(self, fail=False):
            self.fail = fail
        def on_train_batch_end(self, trainer, *args):
            seen["fit"] = alloc.installed()
            if not kept:
                kept.append(torch.full((1 << 18,), 7.0))  # 1 MiB from the guest, kept past the fit
            if self.fail:
                raise RuntimeError("stop")
        def on_validation_batch_end(self, trainer, *args):
            seen["validate"] = alloc.installed()
        def on_test_batch_end(self, trainer, *args):
            seen["test"] = alloc.installed()
        def on_predict_batch_end(self, trainer, *args):
            seen["predict"] = alloc.installed()

    def trainer(fail=False):
        plugin = QLoRAPrecision(compute_dtype="float32", log_report=False)
        return pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, limit_test_batches=1,
                          limit_predict_batches=1, plugins=[plugin], callbacks=[Probe(fail)], logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    result = {"before": alloc.installed()}
    module = Module()
    t = trainer()
    t.fit(module, toy_loader(), toy_loader())
    result["after_fit"] = alloc.installed()
    live = alloc.stats()["live_bytes"]
    result["kept_intact"] = bool((kept[0] == 7.0).all())
    kept.clear()  # freed by the guest after the restore: unmapped, not cached
    result["freed_by_guest"] = live - alloc.stats()["live_bytes"]
    result["cached_after"] = alloc.stats()["cached_bytes"]
    counts = (alloc.stats()["hits"], alloc.stats()["misses"])
    x = torch.ones(1 << 20) * 2  # after the restore: not the guest's
    del x
    result["untouched_after"] = counts == (alloc.stats()["hits"], alloc.stats()["misses"])
    for stage in ("validate", "test", "predict"):
        getattr(t, stage)(module, toy_loader())
        result[f"after_{stage}"] = alloc.installed()
    try:
        trainer(fail=True).fit(Module(), toy_loader())
    except RuntimeError:
        pass
    result["after_failed_fit"] = alloc.installed()
    result["seen"] = seen
    print(json.dumps(result))
"""


@needs_compiler
@pytest.mark.slow
def test_it_is_in_place_during_each_stage_and_the_previous_one_is_back_after(cache: str) -> None:
    result, _ = run(cache, STAGES)
    assert result.pop("seen") == {"fit": True, "validate": True, "test": True, "predict": True}
    assert result == {
        "before": False,
        "after_fit": False,
        "kept_intact": True,
        "freed_by_guest": 1 << 20,
        "cached_after": 0,
        "untouched_after": True,
        "after_validate": False,
        "after_test": False,
        "after_predict": False,
        "after_failed_fit": False,
    }


LOAD = """
    import json, torch
    from torch import nn
    from lightning_qlora import load_quantized
    from lightning_qlora.quantization import cpu_caching_allocator as alloc

    during = []
    def key_map(key):
        during.append(alloc.installed())
        return key

    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    held_by_caller = alloc.install()  # an outer holder (a fit) keeps it across the load
    load_quantized(model, state, key_map=key_map)
    nested = alloc.installed()
    alloc.uninstall()
    model2 = nn.Sequential(nn.Linear(256, 256))
    load_quantized(model2, {k: torch.randn_like(v) for k, v in model2.state_dict().items()}, key_map=key_map)
    print(json.dumps({"held": held_by_caller, "during": sorted(set(during)), "nested": nested,
                      "after": alloc.installed(), "out": list(model2(torch.ones(1, 256)).shape)}))
"""


@needs_compiler
def test_load_quantized_holds_it_for_its_load_and_leaves_an_outer_holder_alone(cache: str) -> None:
    result, _ = run(cache, LOAD)
    assert result == {"held": True, "during": [True], "nested": True, "after": False, "out": [1, 256]}


RAW_AFTER_RESTORE = """
    import json, torch
    from lightning_qlora.quantization import cpu_caching_allocator as alloc

    def rss_anon_mib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

    assert alloc.install()
    live = alloc.stats()["live_bytes"]
    # opaque mkldnn tensors: ideep takes their memory through raw_allocate, from the guest here ...
    dense = [torch.randn(512, 512) for _ in range(40)]
    opaque = [d.to_mkldnn() for d in dense]
    from_guest = (alloc.stats()["live_bytes"] - live) >> 20
    alloc.uninstall()
    before = rss_anon_mib()
    # ... and gives it back through raw_deallocate of the allocator current now: torch's default (free())
    same = all(torch.equal(o.to_dense(), d) for o, d in zip(opaque, dense))
    del opaque
    returned = before - rss_anon_mib()
    assert alloc.install()  # the guest again: addresses glibc unmapped may come back to it
    again = [torch.ones(512, 512) for _ in range(40)]
    sums = {float(t.sum()) for t in again}
    del again
    alloc.uninstall()
    print(json.dumps({"from_guest": from_guest, "same": same, "returned": returned > 35, "sums": list(sums)}))
"""


@needs_compiler
def test_memory_ideep_took_from_it_is_freed_correctly_after_the_restore(cache: str) -> None:
    """Blocks carry glibc's header for a mapped chunk, so glibc's free() after the restore unmaps them."""
    result, _ = run(cache, RAW_AFTER_RESTORE)
    assert result["from_guest"] >= 80  # 40 dense and 40 opaque copies of 1 MiB came from the guest
    assert result == {**result, "same": True, "returned": True, "sums": [512.0 * 512]}


PRELOADED = """
    import json, logging
    logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
    from lightning_qlora.quantization import cpu_caching_allocator as alloc
    print(json.dumps({"other": alloc.preloaded_malloc(), "install": [alloc.install(), alloc.install()],
                      "installed": alloc.installed()}))
"""


def test_it_stays_out_when_another_malloc_is_preloaded(tmp_path: Path) -> None:
    """Found by name among LD_PRELOAD and the loaded libraries (a stand-in named libjemalloc.so.2 here:
    no jemalloc is installed on the test machine); said once, nothing is built."""
    from lightning_qlora._native_build import find_compiler

    cc = find_compiler(("CC",), ("cc", "gcc", "clang"))
    if cc is None:
        pytest.skip("no C compiler to make the stand-in library")
    (tmp_path / "empty.c").write_text("int lq_stand_in(void) { return 0; }\n")
    stand_in = tmp_path / "libjemalloc.so.2"
    subprocess.run([cc, "-shared", "-fPIC", str(tmp_path / "empty.c"), "-o", str(stand_in)], check=True)
    cache = tmp_path / "cache"
    result, stderr = run(str(cache), PRELOADED, {"LD_PRELOAD": str(stand_in)})
    assert result == {"other": "jemalloc", "install": [False, False], "installed": False}
    lines = [line for line in stderr.splitlines() if "jemalloc is in use" in line]
    assert len(lines) == 1 and "not installed" in lines[0]
    assert not cache.exists()  # detected before anything was built
    assert cpu_caching_allocator.preloaded_malloc() is None  # this process: glibc's


def test_install_refuses_invalid_sizes_before_any_work() -> None:
    with pytest.raises(ValueError, match=r"min_bytes must be an integer of at least 1.*min_bytes=0"):
        cpu_caching_allocator.install(min_bytes=0)
    with pytest.raises(ValueError, match=r"cache_bytes=-1"):
        cpu_caching_allocator.install(cache_bytes=-1)
    assert not cpu_caching_allocator.installed()


DISABLED = """
    import json, logging
    logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
    from lightning_qlora.quantization import cpu_caching_allocator as alloc
    print(json.dumps({"install": alloc.install(), "installed": alloc.installed()}))
"""


def test_the_environment_turns_it_off(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result, stderr = run(str(cache), DISABLED, {"LIGHTNING_QLORA_DISABLE_ALLOCATOR": "1"})
    assert result == {"install": False, "installed": False}
    assert "disabled by LIGHTNING_QLORA_DISABLE_ALLOCATOR" in stderr
    assert not cache.exists()

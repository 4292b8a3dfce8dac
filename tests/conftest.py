import os

import pytest
import torch

# Keep tests deterministic and light on a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def has_avx2() -> bool:
    from bcnn.engine._paths import target_features

    return "avx2" in target_features()


@pytest.fixture(
    params=[
        "words",
        pytest.param("lut", marks=pytest.mark.skipif(not has_avx2(), reason="no AVX2")),
    ]
)
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a conv / dense test twice: on uint64 words (``BCNN_KERNEL_PATH=generic`` for the
    prepare_* calls: the popcount kernels, VPOPCNTQ where the target has it, LLVM's sequence
    elsewhere, an AVX2-only host included) and on the lut path's nibbles
    (``BCNN_KERNEL_PATH=lut``; any AVX2 target runs those kernels)."""
    if request.param == "words":
        monkeypatch.setenv("BCNN_KERNEL_PATH", "generic")
    else:
        monkeypatch.setenv("BCNN_KERNEL_PATH", "lut")
        # nibbles at every size here (whatever the short-reduction rule)
        monkeypatch.setattr("bcnn.engine._kernels._weights._LUT_MIN_WORDS", 0)
    return str(request.param)

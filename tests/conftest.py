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
        "active",
        pytest.param("lut", marks=pytest.mark.skipif(not has_avx2(), reason="no AVX2")),
    ]
)
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a conv / dense test twice: on the active kernel path's weights, and on the lut
    path's nibbles (``BCNN_KERNEL_PATH=lut`` for the prepare_* calls; any AVX2 target runs
    those kernels)."""
    if request.param == "lut":
        monkeypatch.setenv("BCNN_KERNEL_PATH", "lut")
        # nibbles at every size here (whatever the short-reduction rule)
        monkeypatch.setattr("bcnn.engine._kernels._weights._LUT_MIN_WORDS", 0)
    return str(request.param)

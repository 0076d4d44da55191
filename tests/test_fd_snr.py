"""FD-SNR diagnostic: the finite-difference signal of an atom scales with the adapter scale."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA
from zotune.diagnostics.fd_snr import SNRConfig, measure, slope, summarize, write_outputs

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "SST-2").exists(), reason="../shared/data not present")


def test_canonical_atom_signal_is_one_over_r_of_topology_signal_at_init(tiny_llama, tmp_path):
    cfg = SNRConfig(model=str(tiny_llama), task="sst2", data_dir=str(SHARED_DATA), ranks=(1, 4, 16),
                    configs=("atom-canonical", "ar1zo"), points=("init",), n_dirs=3, batch_size=4, noise="batch",
                    lora_alpha=2.0)
    rows = measure(cfg, progress=False)
    by = {(r["config"], r["rank"]): r for r in rows}
    for r in (1, 4, 16):
        # Same A, same directions, B = 0: only the scale differs (alpha/r vs alpha).
        ratio = by[("atom-canonical", r)]["S"] / by[("ar1zo", r)]["S"]
        assert ratio == pytest.approx(1 / r, rel=0.05)
    fits = {f["config"]: f for f in summarize(rows)}
    assert fits["atom-canonical"]["slope_S"] < fits["ar1zo"]["slope_S"] - 0.9  # one power of r apart
    write_outputs(rows, summarize(rows), tmp_path)
    for name in ("fd_snr.json", "fd_snr.csv", "fd_snr.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_slope_fit_recovers_a_power_law():
    xs = [1, 2, 4, 8, 16]
    assert slope(xs, [3.0 * x ** -2 for x in xs]) == pytest.approx(-2.0)

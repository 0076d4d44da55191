"""FD-SNR diagnostic and rank sweep: an atom's finite-difference signal scales with the adapter scale."""

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


def test_rank_sweep_writes_its_table_and_plot(tiny_llama, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rank_sweep

    rank_sweep.main(["--model", str(tiny_llama), "--task", "rotten-tomatoes", "--ranks", "1,4", "--steps", "2",
                     "--batch-size", "2", "--train-size", "16", "--dev-size", "4", "--eval-every", "1",
                     "--out", str(tmp_path)])
    table = (tmp_path / "rank_sweep.md").read_text()
    for config in ("mezo-lora", "atom-canonical", "ar1zo"):
        assert f"| {config} | 4 |" in table
    # at r=1 the three queries coincide (one atom is the adapter, alpha/r = alpha): run once
    assert "| mezo-lora | 1 |" in table and "| ar1zo | 1 |" not in table
    # a second call reads the finished runs back instead of training them again
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/summary.json")}
    rank_sweep.main(["--model", str(tiny_llama), "--task", "rotten-tomatoes", "--ranks", "1,4", "--steps", "2",
                     "--batch-size", "2", "--train-size", "16", "--dev-size", "4", "--eval-every", "1",
                     "--out", str(tmp_path)])
    assert len(before) == 4 and {p: p.stat().st_mtime_ns for p in before} == before
    assert (tmp_path / "rank_sweep.md").read_text() == table
    assert "| 4 |" in table  # forward passes: 2 steps x 2
    assert (tmp_path / "rank_sweep.png").stat().st_size > 0

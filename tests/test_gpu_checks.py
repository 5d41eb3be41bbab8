import subprocess

from conftest import ROOT


def test_gpu_checks_script_runs_every_check_at_tiny_shapes(tmp_path):
    """scripts/gpu_checks.sh --tiny: the GPU checks at test-sized shapes on the CPU, so the script cannot rot
    while no GPU is at hand. Every check must run and say ok in the summary."""
    out = tmp_path / "checks"
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "--tiny", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.split("== summary")[-1]
    for check in ("cuda_tests", "bandwidth", "train", "kernels", "speculation", "real_import", "real_bandwidth",
                  "real_finetune", "real_after_finetune"):
        assert (out / f"{check}.status").read_text().strip() == "ok", (out / f"{check}.log").read_text()[-2000:]
        assert check in summary
    assert "of the bandwidth limit" in (out / "bandwidth.log").read_text()
    for log in ("real_bandwidth", "real_after_finetune"):  # bf16 decoding, verification costs, each drafting mode
        text = (out / f"{log}.log").read_text()
        assert "greedy tokens equal to float32's" in text and "verification of k positions" in text
        assert "skip plan auto" in text and "exit layer auto" in text
    assert "tok/s" in (out / "train.log").read_text() and "peak step memory" in (out / "kernels.log").read_text()

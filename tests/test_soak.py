"""bench/soak.py as a user runs it, for seconds instead of minutes: the real MLflow server, Triton, sync
loop and Locust, the catalogue generator from its shipped checkpoint, one promotion under load."""

import json
from pathlib import Path

from tests.conftest import one_line_error, run_cli


def test_a_short_soak_swaps_live_under_load_and_fails_no_request(tmp_path: Path) -> None:
    out = tmp_path / "report"
    # one promotion, at 10 s, with 18 s of load left for the swap to go live (3-18 s on a busy 2-core CPU)
    args = ("--users", "2", "--duration", "28", "--promote-every", "10", "--sample-every", "3")
    result = run_cli("bench/soak.py", *args, "--out", str(out), "--name", "short", timeout=240)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "promoted version 2 (B)" in result.stdout and "live: version 2" in result.stdout

    numbers = json.loads((out / "short.json").read_text())
    verdict = numbers["verdict"]
    assert verdict["requests"] > 100 and verdict["failures"] == 0
    assert verdict["promotions"] == verdict["promotions_live"] == 1
    assert [p["version"] for p in numbers["promotions"]] == ["2"]
    assert [s["version"] for s in numbers["swaps"]] == ["2"]  # the sync loop's own "live:" line
    assert numbers["swaps"][0]["triton_version"] == 2  # a new Triton version, loaded beside the first
    assert numbers["promotions"][0]["t"] < numbers["swaps"][0]["t"]

    samples = numbers["samples"]
    assert len(samples) >= 6
    assert sum(s["requests"] for s in samples) == verdict["requests"] == samples[-1]["total_requests"]
    # Locust's own final statistics count the same requests as the per-request log
    assert numbers["locust"] == {"exit_code": 0, "requests": verdict["requests"], "failures": 0}
    for sample in samples:
        assert sample["triton_mb"] > 0 and sample["sync_mb"] > 0, sample
        assert sample["stubs"] >= 2 and sample["stubs_mb"] > 0, sample  # network + postprocess at least
        assert sample["latency_ms"]["p50"] <= sample["latency_ms"]["p95"] <= sample["latency_ms"]["p99"]
    assert samples[-1]["stubs"] == 4  # after the swap: both composing models at the old and new version

    report = (out / "short.md").read_text()
    assert "**Requests: " in report and ", failures: 0**" in report
    assert "went live under load: 1**" in report and "promoted v2" in report and "live v2" in report
    assert (out / "short.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out.iterdir()) == ["short.json", "short.md", "short.png"]  # no temp left


def test_a_soak_too_short_for_a_promotion_is_refused(tmp_path: Path) -> None:
    result = run_cli("bench/soak.py", "--duration", "10", "--promote-every", "8", "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--duration must be at least twice --promote-every" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = run_cli("bench/soak.py", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "r"))
    one_line_error(result, "none.pt does not exist")
    assert not (tmp_path / "r").exists()

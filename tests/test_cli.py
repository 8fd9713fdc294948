"""The CLI end to end on a tiny local model directory, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from mobiquant.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_writes_table_and_json(capsys, tiny_dir, tiny_text, tmp_path):
    out_json = tmp_path / "rows.json"
    code, out, err = run(capsys, "eval", "--model", tiny_dir, "--text", tiny_text, "--seqlen", 64, "--windows", 3,
                         "--bits", "2,8", "--group-size", 32, "--json", out_json, "--no-progress")
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert [r["method"] for r in rows] == ["fp", "rtn", "rtn", "slices", "slices"]
    assert set(rows[0]) == {"method", "bits_requested", "bits_realized", "ppl", "tokens", "seconds"}
    assert all(r["tokens"] == 3 * 64 and r["ppl"] > 1 for r in rows)
    assert "slices" in out and "bits_realized" in out


def test_quantize_then_eval_checkpoint(capsys, tiny_dir, tiny_text, tmp_path):
    ckpt = tmp_path / "ckpt"
    code, out, err = run(capsys, "quantize", "--model", tiny_dir, "--out", ckpt, "--group-size", 32,
                         "--slice-bits", "3,1,1,1,1,1")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--checkpoint", ckpt, "--text", tiny_text, "--seqlen", 64,
                         "--bits", "3,8", "--methods", "fp,slices", "--no-progress")
    assert code == 0, err
    assert out.count("slices") == 2 and "fp" in out  # fp comes from the source model recorded in the checkpoint


@pytest.mark.parametrize("extra, message", [
    (["--model", "./no/such/dir"], "no such file or directory"),
    (["--model", "not-a-model"], "unknown model"),
    (["--group-size", "48"], "does not divide"),
    (["--bits", "9", "--methods", "rtn"], "integer width 2..8"),
    (["--bits", "3", "--methods", "slices"], "not a uniform precision"),
    (["--methods", "bogus"], "unknown method"),
    (["--seqlen", "100000"], "fewer than one window"),
    (["--windows", "0"], "at least 1"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, tiny_dir, tiny_text, extra, message):
    argv = ["eval", "--text", tiny_text, "--no-progress", "--seqlen", 64]
    argv += extra if "--model" in extra else ["--model", tiny_dir, *extra]
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("mobiquant: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_empty_text_file(capsys, tiny_dir, tmp_path):
    (tmp_path / "e.txt").write_text("")
    code, _, err = run(capsys, "eval", "--model", tiny_dir, "--text", tmp_path / "e.txt")
    assert code == 2 and "is empty" in err


def test_missing_checkpoint(capsys, tiny_text, tmp_path):
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "none", "--text", tiny_text)
    assert code == 2 and "no such checkpoint directory" in err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mobiquant", "eval", "--text", str(tmp_path / "x.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"mobiquant: error: no such text file: {tmp_path / 'x.txt'}"


def test_calibrate_then_eval_every_method(capsys, tiny_dir, tiny_text, tmp_path):
    ckpt = tmp_path / "cal"
    code, out, err = run(capsys, "calibrate", "--model", tiny_dir, "--out", ckpt, "--calib", tiny_text,
                         "--samples", 8, "--seqlen", 32, "--epochs", 1, "--group-size", 32)
    assert code == 0, err
    assert "calibrated in" in out
    out_json = tmp_path / "rows.json"
    code, out, err = run(capsys, "eval", "--checkpoint", ckpt, "--text", tiny_text, "--seqlen", 64,
                         "--budgets", "2.5,4", "--methods", "mobiquant,slices,random,bitspecific,rtn",
                         "--json", out_json, "--no-progress")
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    got = [(r["method"], r["bits_requested"]) for r in rows]
    assert got == [("mobiquant", 2.5), ("mobiquant", 4.0), ("slices", 4.0), ("random", 2.5), ("random", 4.0),
                   ("bitspecific", 4.0), ("rtn", 4.0)]
    assert "method 'slices' skips a budget" in err and "2.5" in err
    for r in rows:
        if r["method"] in ("mobiquant", "random"):
            assert abs(r["bits_realized"] - r["bits_requested"]) < 0.5


def test_outliers_command(capsys, tiny_dir, tiny_text, tmp_path):
    ckpt = tmp_path / "cal"
    assert run(capsys, "calibrate", "--model", tiny_dir, "--out", ckpt, "--calib", tiny_text, "--samples", 4,
               "--seqlen", 32, "--epochs", 1, "--group-size", 32)[0] == 0
    code, out, err = run(capsys, "outliers", "--checkpoint", ckpt, "--text", tiny_text, "--tokens", 100,
                         "--budgets", "4", "--linear", "model.layers.0.mlp.down_proj")
    assert code == 0, err
    assert "Jaccard" in out and "routed 4 bits" in out


def test_calibrate_bad_inputs(capsys, tiny_dir, tmp_path):
    code, _, err = run(capsys, "calibrate", "--model", tiny_dir, "--out", tmp_path / "x", "--calib",
                       tmp_path / "missing.txt")
    assert code == 2 and "no such calibration text file" in err
    code, _, err = run(capsys, "calibrate", "--model", tiny_dir, "--out", tmp_path / "x", "--samples", "0")
    assert code == 2 and "must be >= 1" in err


def test_app_refuses_bad_checkpoints_with_one_line(capsys, tiny_dir, tmp_path):
    """`mobiquant app` on a missing directory, and on a checkpoint without routers: clear errors, no server."""
    pytest.importorskip("gradio")
    assert main(["app", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    ckpt = tmp_path / "plain"
    assert main(["quantize", "--model", str(tiny_dir), "--out", str(ckpt), "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["app", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "no routers" in err and "mobiquant calibrate" in err
    assert main(["app", "--checkpoint", str(ckpt), "--port", "70000"]) == 2

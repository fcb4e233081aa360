"""bench/gpu.py --cpu-check: the GPU benchmark's code paths (full-size builders aside) run on the
tiny models on a CPU, and print the tables an operator reads off a GPU run. The figures on a
CPU mean nothing; that the run completes and its tables hold every row, each a number, does."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each '## title' section's markdown table, as rows of {column: cell}."""
    out: dict[str, list[dict[str, str]]] = {}
    title, header = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:].strip(), None
            out[title] = []
        elif line.startswith("|") and title is not None and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                out[title].append(dict(zip(header, cells)))
    return out


def number(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value) and value > 0, cell
    return value


def test_cpu_check_runs_and_prints_its_tables():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--cpu-check"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.startswith("# rayhorde GPU benchmark on cpu (tiny models)")
    found = tables(out)
    images = found["images"]
    assert {(r["model"], r["n"], r["path"]) for r in images} == {
        (m, n, p) for m in ("sd15", "sdxl", "cascade") for n in ("1", "4") for p in ("ours", "bare")}
    for r in images:
        assert r["steps"] == "3" and r["size"] == ("128" if r["model"] == "cascade" else "64")
        steps_per_second, per_image = number(r["it/s"]), number(r["s/image"])
        assert math.isclose(3 / steps_per_second / int(r["n"]), per_image, rel_tol=0.05)
        assert r["peak GiB"] == "nan"  # no GPU memory to speak of
        if r["path"] == "ours":
            number(r["webp s/img"])
    summary = found["images: ours against bare diffusers, and batching"]
    assert [r["model"] for r in summary] == ["sd15", "sdxl", "cascade"]
    for r in summary:
        for column in ("ours/bare n=1", "ours/bare n=4", "ours n=4 / n=1 images/s"):
            number(r[column])
    (text_title,) = [t for t in found if t.startswith("text")]
    assert text_title == "text: 8 new tokens per request"
    text = found[text_title]
    assert [(r["engine"], r["concurrency"]) for r in text] == [("builtin", "1"), ("builtin", "8"), ("builtin", "32")]
    for r in text:
        assert 0 < int(r["tokens"]) <= 8 * int(r["concurrency"])
        number(r["tokens/s"])
    assert "vllm: not installed here (pip install -e '.[vllm]' on a GPU node); skipped" in out

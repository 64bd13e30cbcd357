"""Wall time and peak memory of a piece of work (moeclip/resources.py): each block gets its own peak."""
import json
import subprocess
import sys
from pathlib import Path

from moeclip.resources import USAGE_LINE, Usage

ROOT = Path(__file__).resolve().parents[1]


BLOCKS = """
import json, time
import numpy as np
from moeclip.resources import measured
MIB = 2**20
with measured() as big:
    block = np.ones(384 * MIB // 8)  # 384 MiB, touched
    block += 1
    time.sleep(0.2)
del block
with measured() as small:
    np.ones(MIB // 8).sum()
print(json.dumps([big[0].as_dict(), small[0].as_dict()]))
"""


def test_each_block_reports_its_own_peak_and_time():
    """In a fresh interpreter: a peak also counts finished child processes (RUSAGE_CHILDREN, which cannot be
    reset), and a test process may have had a large child before this test."""
    done = subprocess.run([sys.executable, "-c", BLOCKS], capture_output=True, text=True, check=True, cwd=ROOT)
    big, small = (Usage(**usage) for usage in json.loads(done.stdout))
    assert big.peak_rss_gib >= 0.375 and big.seconds >= 0.2
    # The high-water mark was reset: the second block's peak is not the first's.
    assert small.peak_rss_gib < big.peak_rss_gib - 0.3
    assert big.cuda_peak_gib is None  # no CUDA work


def test_usage_prints_one_line_and_rounds_for_files():
    usage = Usage(seconds=61.23456, peak_rss_gib=9.87654, cuda_peak_gib=None)
    assert usage.line() == "61.2 s, peak RSS 9.88 GiB"
    assert Usage(1.0, 2.0, 3.456).line() == "1.0 s, peak RSS 2.00 GiB, CUDA peak 3.46 GiB"
    assert usage.as_dict() == {"seconds": 61.235, "peak_rss_gib": 9.877, "cuda_peak_gib": None}
    printed = usage.stage_line("train@visa") + "\n" + Usage(1.0, 2.0, 3.456).stage_line("analysis")
    assert USAGE_LINE.findall(printed) == [("train@visa", "61.2", "9.88", ""), ("analysis", "1.0", "2.00", "3.46")]

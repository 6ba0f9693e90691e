"""casam.runtime: with glibc keeping freed memory, a large tensor allocated again reuses pages instead of faulting
them in (what made LiteMedSAM's encoding ~30 % slower); CASAM_MALLOC_KEEP_MB=0 leaves glibc alone."""

import json
import os
import subprocess
import sys

import pytest

from casam.runtime import MALLOC_KEEP_MB, glibc, malloc_keep_mb

pytestmark = pytest.mark.skipif(not glibc(), reason="glibc's allocator only")

PROBE = """
import json, resource, threading
import torch
from casam.model.backbone import load_backbone
from casam.runtime import allocator_tuned
bb = load_backbone("tiny")  # load_backbone tunes the allocator first
x = torch.randn(1, 16, 1024, 1024)  # 64 MiB, the size of a LiteMedSAM stage-1 activation

def step():  # three fresh 64 MiB results, as an encoder layer makes them
    h = torch.nn.functional.gelu(x)
    h = h * 2 + x
    return float(torch.nn.functional.gelu(h).mean())

def faults_in_new_thread(n):  # as the server's request threads, started after the tuning
    out = {}
    def run():
        step()
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # torch's own threads fault pages in too
        for _ in range(n):
            step()
        out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    t = threading.Thread(target=run)
    t.start(); t.join()
    return out["faults"]

step()
print(json.dumps({"tuned": allocator_tuned(), "faults": faults_in_new_thread(4)}))
"""


def _probe(keep_mb: str) -> dict:
    env = {**os.environ, "CASAM_MALLOC_KEEP_MB": keep_mb}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults():
    tuned, default = _probe("2047"), _probe("0")
    assert tuned["tuned"] and not default["tuned"]
    pages = 4 * 3 * 64 * 2**20 // 4096
    assert default["faults"] > pages // 2  # glibc's default: every 64 MiB result is mmap'd and faulted in anew
    # kept: the freed pages serve the next results (measured 0, or one block of the twelve while the heap settles)
    assert tuned["faults"] <= pages // 6


def test_unreadable_setting_leaves_glibc_alone(monkeypatch):
    pass

    monkeypatch.setenv("CASAM_MALLOC_KEEP_MB", "lots")
    assert malloc_keep_mb() == 0
    monkeypatch.delenv("CASAM_MALLOC_KEEP_MB")
    assert malloc_keep_mb() == MALLOC_KEEP_MB

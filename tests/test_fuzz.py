"""The atheris harnesses (tests/fuzz/, specs/fuzzing.md), run briefly as CI does.

Each harness runs as its own process (libFuzzer owns the process: it exits on the first
crash) on a copy of the committed seed corpus for ``ONIONP2P_FUZZ_SECONDS`` seconds
(default 30), with an RSS limit and a per-input timeout. The test fails if the
harness exits non-zero or leaves a crash/timeout/oom artifact; the log tail and the
reproducer path are in the failure message. ``tools/fuzz`` runs the same harnesses for
longer.

The corpus test needs no atheris: it checks that the committed seeds are what
make_corpus.py writes today, so a changed wire format cannot leave the fuzzer
starting from stale inputs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FUZZ = REPO / "tests" / "fuzz"
SECONDS = int(os.environ.get("ONIONP2P_FUZZ_SECONDS", "30"))
RSS_LIMIT_MB = 1024
INPUT_TIMEOUT = 25  # seconds for one input: anything slower is a hang (quadratic parsing, loops)


def _atheris_problem() -> str | None:
    """None if the harness interpreter can import atheris, else why not."""
    proc = subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["import failed"])[-1]


@pytest.fixture(scope="module")
def atheris_ok() -> None:
    problem = _atheris_problem()
    if problem is not None:
        pytest.skip(f"atheris is not importable ({problem}); install the test extras: pip install -e '.[test]'")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cells", "socks"])
def test_harness_finds_no_crash(name, atheris_ok, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / name, corpus)
    seeds = len(list(corpus.iterdir()))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [sys.executable, str(FUZZ / f"fuzz_{name}.py"), str(corpus),
           f"-max_total_time={SECONDS}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-timeout={INPUT_TIMEOUT}",
           f"-artifact_prefix={artifacts}/", "-print_final_stats=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 240)
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                    if not line.startswith("INFO: Instrumenting"))
    found = sorted(str(p) for p in [*artifacts.iterdir(), *tmp_path.glob("crash-*")])
    assert proc.returncode == 0 and not found, (
        f"fuzz_{name} failed (exit {proc.returncode}); artifacts: {found}\n"
        f"reproduce: {sys.executable} {FUZZ / f'fuzz_{name}.py'} {found[0] if found else '<artifact>'}\n"
        f"then make it a regression test (specs/fuzzing.md)\n{log[-6000:]}")
    # It really fuzzed: every seed loaded, then many more inputs run.
    assert f"{seeds} files found in {corpus}" in log, log[-3000:]
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", log).group(1))
    assert runs > seeds + 100, f"only {runs} inputs executed:\n{log[-3000:]}"
    cov = [int(c) for c in re.findall(r"\bcov: (\d+)", log)]
    assert cov and max(cov) >= 100, f"harness covers almost nothing (cov {cov[-1:]}):\n{log[-3000:]}"


# Seeds whose bytes depend on the RSA identity key that make_corpus.py generates afresh.
_RSA_DEPENDENT = re.compile(r"^(certs-(responder|initiator)|cross_cert-|x509-|verify_certs-|link_|"
                            r"reader-responder-handshake)")


def test_committed_corpus_is_current():
    sys.path.insert(0, str(FUZZ))
    try:
        import make_corpus
    finally:
        sys.path.remove(str(FUZZ))
    for directory, seeds in ((make_corpus.CELLS_DIR, make_corpus.cell_seeds(make_corpus.Chain())),
                             (make_corpus.SOCKS_DIR, make_corpus.socks_seeds())):
        committed = {p.name: p.read_bytes() for p in directory.iterdir()}
        assert sorted(committed) == sorted(seeds), f"{directory}: rerun tests/fuzz/make_corpus.py"
        stale = [n for n, data in seeds.items() if not _RSA_DEPENDENT.match(n) and committed[n] != data]
        assert not stale, f"{directory}: stale seeds {stale}; rerun tests/fuzz/make_corpus.py"
        assert all(len(data) <= 4096 for data in committed.values()), "seeds must stay small"

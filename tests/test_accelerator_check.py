"""experiments/accelerator_check.py: its checks for every backend, run on this CPU."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, command_env

SCRIPT = os.path.join(ROOT, "experiments", "accelerator_check.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load_script()


def test_a_wrong_output_is_reported_as_failing():
    want = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    good = check.compare(want, want, atol=1e-5, rtol=1e-5)
    assert good.ok and good.max_abs == 0.0
    perturbed = want.copy()
    perturbed[1, 2] += 1e-3
    bad = check.compare(perturbed, want, atol=1e-5, rtol=1e-5)
    assert not bad.ok and bad.max_abs == pytest.approx(1e-3, rel=1e-3) and bad.excess > 1
    assert not check.compare(np.where(want > 0.9, np.nan, want), want, atol=1, rtol=1).ok
    with pytest.raises(ValueError, match=r"got: shape \(2, 4\)"):
        check.compare(want[:2], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"atol, rtol: expected >= 0"):
        check.compare(want, want, atol=-1.0, rtol=0.0)

    row = check.Check("none_vs_xla", "plain", "float32", "chunked", good, good, None)
    wrong = dataclasses.replace(row, case="mask", forward=bad)
    not_zero = dataclasses.replace(row, case="key lengths", dead_rows_zero=False)
    text = check.render([row, wrong, not_zero])
    assert "**Result: 2 of 3 checks FAILED.**" in text
    assert text.count("| **FAIL** |") == 2 and "**not zero**" in text
    # Where None took xla, xla met itself: such a row counts only if it failed.
    itself = dataclasses.replace(row, detail="xla")
    text = check.render([row, itself, dataclasses.replace(not_zero, detail="xla")])
    assert "**Result: 1 of 2 checks FAILED.** Not counted: 2 rows where None took xla" in text
    assert "**Result: all 1 checks passed.** Not counted: 1 rows" in check.render([row, itself])


@pytest.mark.slow
def test_the_command_passes_every_check_here_and_says_what_did_not_run(tmp_path):
    out = tmp_path / "report.md"
    # Without XLA's optimization passes, like the rest of the tests: compiling is most
    # of the command's time here, and the numbers it compares do not depend on them.
    done = subprocess.run(
        [sys.executable, SCRIPT, f"--out={out}"], env=command_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    # On CPU only the long case takes another path than xla (two dtypes).
    alone = 2 * len(check.CASES) - 2
    assert f"**Result: all 2 checks passed.** Not counted: {alone} rows where" in text
    # The long case takes the chunked path on CPU: two paths compared, not one with itself.
    assert "| long GQA causal lengths | float32 | chunked |" in text
    assert text.count("Not run: the backend is cpu, not gpu.") == 3
    assert done.stdout.splitlines()[0].startswith("Result: all 2 checks passed.")
    assert not done.stderr.strip(), done.stderr  # library logs stay hidden

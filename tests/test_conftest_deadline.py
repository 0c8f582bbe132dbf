"""The session's per-test deadline (tests/conftest.py): a test that hangs in the test
process itself ends the session with its stacks and status 3, and the processes it started
are killed, instead of running into CI's limit with nothing said."""

import textwrap
from pathlib import Path

from tests.multiproc import PYTHON, ROOT, run_cmd

HANGS = """
import subprocess
import time

def test_fast():
    pass

def test_hangs(tmp_path):
    child = subprocess.Popen(["sleep", "120"])
    (tmp_path.parent / "child.pid").write_text(str(child.pid))
    time.sleep(120)

def test_never_reached():
    pass
"""


def test_a_hang_ends_the_session_with_its_stacks(tmp_path):
    (tmp_path / "test_hang.py").write_text(textwrap.dedent(HANGS))
    base = tmp_path / "base"
    # 0.004 x 300 s = 1.2 s. The outer deadline, 60 s, is for the imports of torch and pytest.
    done = run_cmd(
        [PYTHON, "-m", "pytest", "-p", "tests.conftest", "--basetemp", str(base),
         str(tmp_path / "test_hang.py")],
        env={"TEST_DEADLINE_SCALE": "0.004", "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, (done.stdout, done.stderr)
    said = done.stdout + done.stderr
    assert "test_hang.py::test_hangs still runs after its deadline of 1 s" in said, said
    assert "in test_hangs" in said, said  # the hung test's own frame is in the stacks
    assert "killed its" in said and "test_never_reached" not in said, said
    pid = int((base / "child.pid").read_text())
    try:  # a killed child that nobody waited for is a zombie until the sleep's parent exits
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"the test's child {pid} still runs: {state}"

"""The package imports and works in a brand-new virtual environment (no pip, no other package),
installed by copying it into the venv's site-packages as a wheel would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import trickle_relay

SMOKE = r"""
import json, trickle_relay as t
from trickle_relay.testing import TrickleServer
assert t.__file__.startswith(PREFIX), t.__file__
got = []
class Sink:
    def emit(self, e): got.append(e)
t.set_telemetry_sink(Sink())
t.publish_event("stream_started", session_id="s", metadata={"fps": 30.0})
server = TrickleServer()
url = server.create_channel("events")
sink = t.TrickleEventsSink(url)
t.set_telemetry_sink(sink)
for i in range(3):
    t.publish_event("stream_heartbeat", metadata={"i": i})
final = sink.close(timeout=10)
server.close()
print(json.dumps({"python_sink": got[0]["data"], "delivered": final["delivered"],
                  "doc": len(t.publish_event.__doc__)}))
"""


def test_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    src = Path(trickle_relay.__file__).resolve().parent
    dest = Path(site) / "trickle_relay"
    # Copy the installed package (symlinks resolved), as unpacking the wheel would.
    shutil.copytree(Path(trickle_relay.__file__).parent, dest, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert (dest / "_native.abi3.so").is_file() and (dest / "__init__.py").is_file(), src
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [python, "-I", "-c", f"PREFIX = {str(venv)!r}\n" + SMOKE],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["python_sink"]["session_id"] == "s" and out["python_sink"]["fps"] == 30.0
    assert out["delivered"] == 3
    assert out["doc"] > 40

"""Files pneumoseg writes get mode 0o666 less the umask in force when they are written, as
``open(path, "w")`` gives: a service that tightens its umask after importing pneumoseg (patient
images, submissions) must not get world-readable outputs, nor a loosened mask at import."""
from __future__ import annotations

import json

from isolated import run_isolated


def test_outputs_follow_the_umask_in_force_when_written(tmp_path):
    result = run_isolated(f"""
        import json, os, stat
        from pathlib import Path
        from pneumoseg import _fs

        out = Path({str(tmp_path)!r})
        modes = {{}}
        for mask in (0o077, 0o002, 0o022):
            os.umask(mask)
            single = _fs.atomic_write(out / f"single-{{mask:o}}.csv", "a,b\\n")
            with _fs.prepare_output_folder(out / f"run-{{mask:o}}") as folder:
                written = folder.write_bytes("summary.json", data="{{}}")
                with folder.filled_in_place("images.npy") as filling:
                    filling.write_bytes(b"x")
                filled = folder.file("images.npy")
            modes[f"{{mask:o}}"] = [stat.S_IMODE(p.stat().st_mode) for p in (single, written, filled)]
        print(json.dumps(modes))
    """)
    assert result.returncode == 0, result.stderr
    modes = json.loads(result.stdout.strip().splitlines()[-1])
    assert modes == {"77": [0o600] * 3, "2": [0o664] * 3, "22": [0o644] * 3}


def test_importing_pneumoseg_leaves_the_umask_alone(tmp_path):
    # Reading the umask means setting it; a module that did so at import left the whole process at
    # umask 0 for a moment, when a file another thread created came out world-writable.
    result = run_isolated("""
        import os
        calls = []
        real = os.umask
        os.umask = lambda mask: calls.append(mask) or real(mask)
        import pneumoseg._fs, pneumoseg.cli, pneumoseg.data, pneumoseg.infer
        print(calls)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"

"""`pip install .` in a fresh virtualenv gives twistd and twist the plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).parent.parent


def clean_environment() -> dict[str, str]:
    """
    This environment without what would make the fresh virtualenv see our
    packages (trial -j sets PYTHONPATH for its workers): pip would then find
    Twisted installed already and leave the venv without twistd.
    """
    hidden = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONUSERBASE"}
    return {k: v for k, v in os.environ.items() if k not in hidden}


class PackagingTests(TestCase):
    def test_wheel_installs_the_plugin(self) -> None:
        """
        The wheel ships twisted/plugins/lineserver_plugin.py and no
        twisted/plugins/__init__.py (which would replace Twisted's own), and
        in a fresh virtualenv both twistd and twist find the plugin.
        """
        env = clean_environment()
        with tempfile.TemporaryDirectory() as tmp:
            wheels = Path(tmp, "wheels")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--no-deps",
                    "--wheel-dir",
                    str(wheels),
                    str(ROOT),
                ],
                check=True,
                capture_output=True,
                cwd=tmp,
                env=env,
            )
            (wheel,) = wheels.glob("lineserver-*.whl")
            names = zipfile.ZipFile(wheel).namelist()
            self.assertIn("twisted/plugins/lineserver_plugin.py", names)
            self.assertNotIn("twisted/plugins/__init__.py", names)
            self.assertNotIn("twisted/__init__.py", names)

            venv = Path(tmp, "venv")
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], check=True, env=env
            )
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)],
                check=True,
                capture_output=True,
                cwd=tmp,
                env=env,
            )
            for runner, args in (
                ("twistd", ["lineserver", "--help"]),
                ("twist", ["lineserver", "--help"]),
            ):
                done = subprocess.run(
                    [str(venv / "bin" / runner), *args],
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                    env=env,
                    timeout=60,
                )
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertIn("--max-line-length", done.stdout)
